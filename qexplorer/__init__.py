"""qexplorer: choose how to quantize an LLM, with memory you can trust."""

__version__ = "0.1.0"
