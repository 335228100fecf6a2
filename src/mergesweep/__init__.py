"""mergesweep: reproducible model-merging benchmarks (fetch → finetune → align → merge → evaluate → aggregate)."""

__version__ = "0.1.0"
