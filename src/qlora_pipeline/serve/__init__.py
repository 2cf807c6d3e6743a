"""Serving: the chat (llama-cpp-python), the Gradio app split by job, and its request body limit.

This package is torch-free (an import-linter contract in pyproject.toml says so): the Space copies
it whole, with the few core modules it imports, and installs only ``app/requirements.txt``.
"""
