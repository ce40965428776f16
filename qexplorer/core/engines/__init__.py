"""Engines behind one interface (see :mod:`qexplorer.core.engines.base`): llama.cpp, vLLM, transformers."""
