"""Distilled Decoding (DD): distil image autoregressive models (VAR, LlamaGen) into 1-2 step generators."""

__version__ = "0.1.0"
