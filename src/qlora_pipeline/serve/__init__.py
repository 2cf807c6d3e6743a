"""Serving: the chat (llama-cpp-python), the Gradio app, its request body limit and the Space builder.

This package is torch-free (an import-linter contract in pyproject.toml says so): the Space copies
it whole, with the few core modules it imports, and installs only ``app/requirements.txt``.
"""
