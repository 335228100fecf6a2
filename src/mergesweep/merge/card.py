"""The model card (README.md) of a merged checkpoint: what was merged, how, from what, with what."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import yaml

from mergesweep.merge.spec import MethodSpec


def equivalent_yaml(meta: dict, base: Path | None, experts: Sequence[Path]) -> str:
    """The ``mergesweep merge --config`` YAML that reproduces this merge."""
    doc: dict = {"method": meta["method"], "base": str(base) if base else None,
                 "experts": [str(p) for p in experts], "params": meta["params"], "dtype": meta["dtype"],
                 "device": meta["device"], "shard_size": meta["shard_size"], "vocab_policy": meta["vocab_policy"]}
    if meta.get("align"):
        doc["align"] = {k: v["path"] for k, v in meta["align"].items()}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def render_model_card(spec: MethodSpec, meta: dict, base: Path | None, experts: Sequence[Path]) -> str:
    front = {
        "library_name": "transformers",
        "tags": ["merge", "mergesweep", spec.name],
    }
    if base:
        front["base_model"] = meta["base"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {meta['model_id']}", ""]
    lines += [f"A merge made with mergesweep using **{spec.name}**: {spec.summary}.", ""]
    lines += [f"Method reference: {spec.paper}."]
    if spec.deviations:
        lines += ["", f"Implementation notes: {spec.deviations}."]
    lines += ["", "## Parameters", "", "| parameter | value |", "|---|---|"]
    for k, v in meta["params"].items():
        lines.append(f"| `{k}` | `{json.dumps(v)}` |")
    lines += ["", "## Inputs", "", "| role | name | path | id | revision / source | fingerprint (sha256) |",
              "|---|---|---|---|---|---|"]
    for d in meta["inputs"]:
        rev = d.get("revision") or d.get("source") or ""
        lines.append(f"| {d['role']} | {d['name']} | `{d['path']}` | {d.get('model_id') or ''} | {rev} | `{d['fingerprint']}` |")
    if meta.get("align"):
        lines += ["", "Alignment (permutation maps applied to experts before merging):", ""]
        for k, v in meta["align"].items():
            lines.append(f"- expert {k}: `{v['path']}` (sha256 `{v['sha256']}`)")
    lines += ["", "## Output", "",
              f"- dtype: {meta['dtype']} (computed in float32 on {meta['device']})",
              f"- tensors: {meta['num_tensors']}, parameters: {meta['num_parameters']:,}",
              f"- vocabulary policy: {meta['vocab_policy']}",
              f"- merge time: {meta['runtime_s']} s, peak RSS: {meta['peak_rss_mb']} MB"]
    if meta.get("statistics"):
        lines.append(f"- whole-model statistics: `{meta['statistics']}`")
    lines += ["", "## Versions", ""]
    for k, v in meta["versions"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Reproduce", "", "```yaml", equivalent_yaml(meta, base, experts).rstrip(), "```", "",
              "```bash", "mergesweep merge --config merge.yaml --out OUT_DIR", "```", ""]
    return "\n".join(lines)
