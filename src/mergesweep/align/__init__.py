"""Permutation alignment of transformer checkpoints and linear mode connectivity.

- :mod:`~mergesweep.align.spec`       permutation structure from a HF config (supported types, errors)
- :mod:`~mergesweep.align.permmap`    permutation maps: validation, inverse, identity fraction, file I/O
- :mod:`~mergesweep.align.apply`      ``load_perm_map`` / ``permute_tensor``: the merge engine's hook
- :mod:`~mergesweep.align.weight_matching`, :mod:`~mergesweep.align.activation_matching`  the algorithms
- :mod:`~mergesweep.align.pipeline`   ``align_checkpoints``: directories in, map with report out
- :mod:`~mergesweep.align.lmc`        loss along the linear path, barrier, plot
- :mod:`~mergesweep.align.toy`        tiny trainable models for tests and demos

See docs/align.md.
"""
