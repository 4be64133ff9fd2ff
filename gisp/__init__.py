"""gisp: Global Iterative Structured Pruning of LLM decoders (arXiv 2510.18030)."""

from gisp.compact import register_auto_classes

__version__ = "0.1.0"

# `import gisp` is all it takes for AutoModelForCausalLM.from_pretrained(EXPORTED_FOLDER) to work.
register_auto_classes()
