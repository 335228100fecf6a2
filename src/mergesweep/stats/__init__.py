"""The ``stats`` stage: per (model, calibration data) statistics that data-aware merges read.

One streamed pass over a model's calibration data computes what a method declares it needs
(``MethodSpec.data_stats``): input Gram matrices of every linear layer (RegMean), the diagonal
Fisher information (Fisher merging). The result is a directory with ``stats.safetensors`` and a
record ``stats.json`` (:mod:`mergesweep.stats.io`), at a plan-owned, content-addressed path,
so every merge that needs the same statistics reads one computation.
"""
