"""The sweep plan: from a validated workflow config to the concrete models, merges and suites.

The Snakemake rules (``workflow/rules/common.smk``) call :func:`build_plan` once; everything that
decides *what* is computed lives here, is importable without Snakemake, and is unit-tested.

Ids:

- the base and experts keep their configured names as model ids, and get a *uid*
  (``name@hash``) that covers their whole definition (source or recipe, and the base's uid);
- a merge's model id is ``<method>-<hash>`` of (method, parameters, input uids, alignment), see
  :func:`mergesweep.ids.merge_model_id`, so the same merge is computed once even when two
  entries of ``merges`` expand to the same point.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesweep.errors import ConfigError
from mergesweep.ids import merge_model_id, short_hash

FINETUNE_DEFAULTS = {"steps": 60, "batch_size": 8, "lr": 1e-4, "warmup": 5, "train_embeddings": False}
PRETRAIN_DEFAULTS = {"steps": 150, "batch_size": 32, "lr": 3e-3, "hidden": 64, "layers": 2, "heads": 4,
                     "kv_heads": 2, "intermediate": 128, "vocab_size": 512}


@dataclass
class Merge:
    model_id: str
    method: str
    params: dict
    experts: list[str]
    align: dict | None
    entry: int  # index in config["merges"]

    def yaml_doc(self, base_dir: str, expert_dirs: list[str], merge_cfg: dict,
                 align_maps: dict[str, str] | None = None) -> dict:
        doc = {
            "method": self.method,
            "base": base_dir,
            "experts": expert_dirs,
            "expert_names": list(self.experts),
            "params": self.params,
            "device": merge_cfg.get("device", "cpu"),
            "shard_size": merge_cfg.get("shard_size", "2GB"),
            "vocab_policy": merge_cfg.get("vocab_policy", "error"),
        }
        if merge_cfg.get("dtype"):
            doc["dtype"] = merge_cfg["dtype"]
        if align_maps:
            doc["align"] = align_maps
        return doc


@dataclass
class Plan:
    base: str
    base_uid: str
    experts: dict[str, dict]  # name -> {"skill", "source"|None, "finetune", "uid"}
    skills: list[str]
    heldout: list[str]
    lm_eval_suites: dict[str, Any]  # name -> mergesweep.evaluate.suites.Suite
    merges: dict[str, Merge] = field(default_factory=dict)

    @property
    def suites(self) -> list[str]:
        return [*self.skills, *self.heldout, *self.lm_eval_suites]

    @property
    def models(self) -> list[str]:
        return [self.base, *self.experts, *self.merges]

    def model_dir(self, model_id: str) -> str:
        if model_id == self.base:
            return f"resources/checkpoints/{model_id}"
        if model_id in self.experts:
            e = self.experts[model_id]
            return f"resources/checkpoints/{model_id}" if e["source"] else f"resources/experts/{model_id}"
        if model_id in self.merges:
            return f"results/models/{model_id}"
        raise ConfigError(f"unknown model id '{model_id}'")

    def role(self, model_id: str) -> str:
        return "base" if model_id == self.base else "expert" if model_id in self.experts else "merged"


def _uid(name: str, definition: Any) -> str:
    return f"{name}@{short_hash(definition, 8)}"


def build_plan(config: dict) -> Plan:
    """Expand the config's merge grids into concrete merges and check cross-references.

    Raises ConfigError naming the key (``merges[1].method``, ``experts[0].skill``...)."""
    from mergesweep.merge.grid import expand_grid
    from mergesweep.merge.methods import REGISTRY

    base = config["base"]
    base_def = {"source": base.get("source"), "pretrain": base.get("pretrain"), "seed": config.get("seed", 0)}
    base_uid = _uid(base["name"], base_def)
    suites = config["suites"]
    skills = list(suites["skills"])
    heldout = list(suites.get("heldout") or [])
    from mergesweep.evaluate.suites import resolve

    lm_eval_suites = {name: resolve(name, v) for name, v in (suites.get("lm_eval") or {}).items()}
    ft_defaults = {**FINETUNE_DEFAULTS, **(config.get("finetune") or {})}

    experts: dict[str, dict] = {}
    for i, e in enumerate(config["experts"]):
        name = e["name"]
        if name in experts or name == base["name"]:
            raise ConfigError(f"experts[{i}].name: '{name}' is used twice")
        if e["skill"] not in skills:
            raise ConfigError(f"experts[{i}].skill: '{e['skill']}' is not one of suites.skills ({', '.join(skills)})")
        ft = {**ft_defaults, **(e.get("finetune") or {})}
        ft.setdefault("seed", config.get("seed", 0))
        definition = {"skill": e["skill"], "source": e.get("source"), "finetune": None if e.get("source") else ft,
                      "base": base_uid, "sizes": suites.get("sizes")}
        experts[name] = {"skill": e["skill"], "source": e.get("source"), "finetune": ft,
                         "uid": _uid(name, definition)}

    plan = Plan(base=base["name"], base_uid=base_uid, experts=experts, skills=skills, heldout=heldout,
                lm_eval_suites=lm_eval_suites)
    for i, m in enumerate(config.get("merges") or []):
        key = f"merges[{i}]"
        method = m["method"]
        if method not in REGISTRY:
            raise ConfigError(f"{key}.method: unknown merge method '{method}' (known: {', '.join(sorted(REGISTRY))})")
        names = list(m.get("experts") or experts)
        for n in names:
            if n not in experts:
                raise ConfigError(f"{key}.experts: '{n}' is not a configured expert ({', '.join(experts)})")
        try:
            points = expand_grid(m.get("params") or {})
        except ConfigError as err:
            raise ConfigError(f"{key}.params: {err}") from None
        align = m.get("align")
        out_dtype = (config.get("merge") or {}).get("dtype")
        for point in points:
            _check_params(method, point, names, key)
            # the output dtype changes the weights, so it is part of the content id when set
            id_params = {**point, "__dtype__": out_dtype} if out_dtype else point
            mid = merge_model_id(method, id_params, base_uid, [experts[n]["uid"] for n in names], align)
            if mid not in plan.merges:
                plan.merges[mid] = Merge(mid, method, point, names, align, i)
    return plan


def _check_params(method: str, params: dict, names: list[str], key: str) -> None:
    """Validate one grid point against the method spec (types, ranges, expert count)."""
    from mergesweep.merge.methods import get_method
    from mergesweep.merge.spec import resolve_params

    spec = get_method(method)
    try:
        spec.check_inputs(len(names), True)
        resolve_params(spec, params, len(names), names, has_base=True)
    except ConfigError as err:
        raise ConfigError(f"{key}.params: {err}") from None


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def provenance(config: dict, plan: Plan, root: str | Path = ".") -> dict:
    """The run's provenance: config hash, checkpoint ids/revisions/fingerprints, versions."""
    import importlib.metadata as md

    root = Path(root)
    ckpts = {}
    for mid in [plan.base, *plan.experts]:
        meta_path = root / plan.model_dir(mid) / "mergesweep.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        src = meta.get("source") or {}
        ckpts[mid] = {"role": plan.role(mid), "uid": plan.base_uid if mid == plan.base else plan.experts[mid]["uid"],
                      "source": src.get("type"), "revision": src.get("revision") or src.get("repo_id"),
                      "sha256": src.get("sha256"), "fingerprint": meta.get("fingerprint") or meta.get("base_fingerprint")}
    versions = {}
    for pkg in ("mergesweep", "torch", "transformers", "lm_eval", "snakemake", "safetensors", "pandas"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"config_hash": config_hash(config), "config": config, "checkpoints": ckpts, "versions": versions,
            "merges": {k: {"method": m.method, "params": m.params, "experts": m.experts} for k, m in plan.merges.items()}}
