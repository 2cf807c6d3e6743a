"""GGUF files with llama.cpp's own tools: conversion, quantization and its variants, the checks
before converting, the importance matrix, the LoRA adapter as a GGUF, Ollama's Modelfile and the
llama.cpp files taken from the llama-cpp-python sources. Libraries that the export stage and the
evaluation call; none of them is a stage.
"""
