"""LoRA adapters (PEFT's format) as merge inputs and outputs.

* :mod:`mergesweep.lora.adapter` - reading and validating an adapter directory
  (:class:`~mergesweep.lora.adapter.AdapterReader`), the dense view base + ΔW that the merge engine
  streams (:class:`~mergesweep.lora.adapter.LoraCheckpoint`, :func:`~mergesweep.lora.adapter.open_checkpoint`);
* :mod:`mergesweep.lora.write` - writing an adapter from its factors (loadable by ``peft``);
* :mod:`mergesweep.lora.extract` - a LoRA adapter from a dense expert by truncated SVD of its task
  vector (``mergesweep lora-extract``).

Submodules are imported on use (torch and peft are heavy); this package imports nothing.
"""
