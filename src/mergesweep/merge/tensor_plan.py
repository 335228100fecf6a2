"""Tensor planning: which tensor of which input feeds each output tensor, and its output shape.

The output's tensor set is the *reference*'s (the base, or expert 0 without a base). Planning
checks every input against it before anything is read:

* a tensor the reference has and an input lacks is an error - except an ``lm_head`` that a tied
  input does not store, for which its embedding matrix stands in;
* a tensor an input has and the reference lacks is an error - except an ``lm_head`` when the
  reference ties its head to the embeddings (the output then has no head tensor);
* **tie mismatches** (the reference ties ``lm_head`` to the embeddings and an input does not, or
  the other way round) change what is merged: an untied input's own head is lost in a tied output,
  and a tied input merged into an untied output contributes its *embedding* change as a head task
  vector. Both are logged as warnings naming the tensor and the input, and are errors unless
  ``tie_policy="allow"``;
* embedding/``lm_head`` matrices that differ only in their number of rows follow the vocabulary
  policy (``error``, ``base``: the base's rows, ``truncate``: the rows every input has); any other
  shape difference is an error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from mergesweep.errors import ConfigError, MergeError
from mergesweep.merge.names import is_embedding, is_lm_head
from mergesweep.merge.settings import check_vocab_policy

if TYPE_CHECKING:
    import torch

    from mergesweep.checkpoints.layout import CheckpointReader

log = logging.getLogger(__name__)

#: what to do when the reference and an input disagree on tied embeddings
TIE_POLICIES = ("error", "allow")


def check_tie_policy(value, key: str = "tie_policy") -> str:
    if value not in TIE_POLICIES:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(TIE_POLICIES)}")
    return value


def check_policies(vocab_policy, tie_policy, has_base: bool) -> None:
    """Both policies valid, and ``vocab_policy: base`` only with a base: without one the rows an
    expert lacks would come from expert 0, counting it twice there."""
    check_vocab_policy(vocab_policy)
    check_tie_policy(tie_policy)
    if vocab_policy == "base" and not has_base:
        raise ConfigError("vocab_policy: 'base' keeps the base's embedding rows and needs a base model "
                          "(none given); use vocab_policy: truncate, or give a base")


@dataclass
class Source:
    name: str  # tensor name inside that input (differs for a tied lm_head)
    rows: int | None = None  # crop to / pad up to this many rows (vocabulary policy)


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: "torch.dtype"
    merge: bool  # False: non-floating tensor copied from the reference
    sources: list[Source | None] = field(default_factory=list)  # index 0 = base (or None), then experts


@dataclass
class MergePlan:
    tensors: list[TensorPlan]
    vocab_size: int | None  # the output's vocabulary when the policy changed the reference's

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(tp.shape) for tp in self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def plan_tensors(
    reference: "CheckpointReader",
    base: "CheckpointReader | None",
    experts: Sequence["CheckpointReader"],
    out_dtype: "torch.dtype",
    vocab_policy: str = "error",
    tie_policy: str = "error",
) -> MergePlan:
    """Check every input against ``reference`` and plan each output tensor (see the module
    docstring). Raises :class:`MergeError` naming the input, file and tensor."""
    check_policies(vocab_policy, tie_policy, has_base=base is not None)
    inputs: list[CheckpointReader | None] = [base, *experts]
    others = [inp for inp in inputs if inp is not None and inp is not reference]
    _check_ties(reference, others, tie_policy)
    _check_extra_tensors(reference, others)
    tensors: list[TensorPlan] = []
    vocab_size: int | None = None
    for name in reference.keys():
        sources = [None if inp is None else Source(_source_name(name, inp, reference)) for inp in inputs]
        if not reference.is_floating_point(name):
            tensors.append(TensorPlan(name, reference.shape(name), reference.dtype(name), False, sources))
            continue
        shape = _output_shape(name, reference, inputs, sources, vocab_policy)
        if shape != reference.shape(name):
            vocab_size = shape[0]
        tensors.append(TensorPlan(name, shape, out_dtype, True, sources))
    return MergePlan(tensors, vocab_size)


def _head_name(inp: "CheckpointReader") -> str | None:
    return next((k for k in inp.keys() if is_lm_head(k)), None)


def _embedding_name(inp: "CheckpointReader") -> str | None:
    return next((k for k in inp.keys() if is_embedding(k)), None)


def _ties_head(inp: "CheckpointReader") -> bool:
    """Whether ``inp``'s output head is its embedding matrix: it stores no head, or its config
    says the head is tied (then a stored head is a copy that transformers overwrites on load)."""
    return _head_name(inp) is None or inp.tied_embeddings


def _check_ties(reference: "CheckpointReader", others: Sequence["CheckpointReader"], tie_policy: str) -> None:
    ref_tied = _ties_head(reference)
    ref_head = _head_name(reference)
    for inp in others:
        if _ties_head(inp) == ref_tied or _embedding_name(inp) is None:
            continue
        head = _head_name(inp)
        if ref_tied:
            msg = (f"{inp.label}: its own (untied) '{head}' in {inp.path} is lost: the output ties lm_head to "
                   f"the embeddings as {reference.label} does, so its head is the merged embedding matrix")
        else:
            what = f"'{head}'" if head else f"its embedding matrix '{_embedding_name(inp)}'"
            msg = (f"{inp.label}: ties lm_head to its embeddings but {reference.label} has its own "
                   f"'{ref_head}'; {what} from {inp.path} stands in for the head, so the merged head gets "
                   f"this input's embedding change as a head task vector")
        log.warning("%s", msg)
        if tie_policy != "allow":
            raise MergeError(f"{msg} (set tie_policy: allow to merge anyway)")


def _check_extra_tensors(reference: "CheckpointReader", others: Sequence["CheckpointReader"]) -> None:
    ref_has_head = _head_name(reference) is not None
    for inp in others:
        for k in inp.keys():
            if k in reference:
                continue
            if is_lm_head(k) and not ref_has_head:
                log.info("%s: '%s' not merged (the output ties lm_head to the embeddings, as %s does)",
                         inp.label, k, reference.label)
                continue
            raise MergeError(f"{inp.label}: has tensor '{k}' that {reference.label} ({reference.path}) lacks")


def _source_name(name: str, inp: "CheckpointReader", reference: "CheckpointReader") -> str:
    if name in inp:
        return name
    emb = _embedding_name(inp)
    if is_lm_head(name) and emb is not None:
        return emb  # tied checkpoint: lm_head is the embedding matrix
    raise MergeError(f"{inp.label}: tensor '{name}' is missing in {inp.path} (present in {reference.label})")


def _output_shape(name: str, reference: "CheckpointReader", inputs: Sequence["CheckpointReader | None"],
                  sources: list[Source | None], vocab_policy: str) -> tuple[int, ...]:
    """The output shape of a floating tensor; sets ``Source.rows`` where the vocabulary policy
    crops or pads an input."""
    ref_shape = reference.shape(name)
    present = [(inp, src, inp.shape(src.name)) for inp, src in zip(inputs, sources) if inp is not None]
    differing = [(inp, s) for inp, _, s in present if s != ref_shape]
    if not differing:
        return ref_shape
    only_rows = all(len(s) == len(ref_shape) and s[1:] == ref_shape[1:] for _, s in differing)
    inp0, s0 = differing[0]
    desc = f"tensor '{name}': {inp0.label} has shape {list(s0)} but {reference.label} has {list(ref_shape)}"
    if not (only_rows and (is_embedding(name) or is_lm_head(name))):
        raise MergeError(f"{desc} (shape mismatch; the checkpoints are not the same architecture)")
    if vocab_policy == "error":
        has_base = inputs[0] is not None
        options = (f"vocab_policy: base (keep the base's {ref_shape[0]} rows; rows an input lacks are taken "
                   f"from the base) or " if has_base else "")
        raise MergeError(f"{desc}: the vocabulary sizes differ. Set {options}vocab_policy: truncate "
                         f"(keep the rows all inputs share)")
    rows = ref_shape[0] if vocab_policy == "base" else min(s[0] for _, _, s in present)
    for _, src, s in present:
        if s[0] != rows:
            src.rows = rows
    return (rows,) + tuple(ref_shape[1:])
