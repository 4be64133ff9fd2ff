"""gisp: Global Iterative Structured Pruning of LLM decoders (arXiv 2510.18030)."""

__version__ = "0.1.0"
