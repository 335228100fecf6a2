"""The model card (README.md) of a merged checkpoint, rendered from its record (``mergesweep.json``):
what was merged, how, from what, with what."""

from __future__ import annotations

import json

import yaml

from mergesweep.record import ModelRecord


def equivalent_yaml(record: ModelRecord) -> str:
    """The ``mergesweep merge --config`` YAML that reproduces this merge (and its model id)."""
    x = record.extra
    inputs = x.get("inputs") or []
    base = next((d["path"] for d in inputs if d["role"] == "base"), None)
    doc: dict = {"method": record.method, "base": base,
                 "experts": [d["path"] for d in inputs if d["role"] == "expert"],
                 "expert_names": x.get("expert_names"), "params": record.params,
                 "dtype": x.get("requested_dtype"), "device": x.get("device"), "shard_size": x.get("shard_size"),
                 "vocab_policy": x.get("vocab_policy")}
    if x.get("tie_policy", "error") != "error":
        doc["tie_policy"] = x["tie_policy"]
    if x.get("align"):
        doc["align"] = {int(k): v["path"] for k, v in x["align"].items()}
    if x.get("data_statistics"):
        doc["stats"] = {name: v["path"] for name, v in x["data_statistics"].items()}
    if x.get("calibration"):
        doc["calibration"] = {name: {"path": v["path"], "uid": v["uid"]} for name, v in x["calibration"].items()}
        doc["calibration_settings"] = x.get("calibration_settings")
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def render_model_card(record: ModelRecord) -> str:
    from mergesweep.merge.methods import get_method

    spec = get_method(record.method)
    x = record.extra
    # a LoRA-native merge's output is a PEFT adapter (its record carries the adapter's settings)
    library = "peft" if x.get("adapter") else "transformers"
    front = {"library_name": library, "tags": ["merge", "mergesweep", spec.name]}
    if record.base:
        front["base_model"] = record.base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {record.model_id}", ""]
    lines += [f"A merge made with mergesweep using **{spec.name}**: {spec.summary}.", ""]
    lines += [f"Method reference: {spec.paper}."]
    if spec.deviations:
        lines += ["", f"Implementation notes: {spec.deviations}."]
    lines += ["", "## Parameters", "", "| parameter | value |", "|---|---|"]
    for k, v in (record.params or {}).items():
        lines.append(f"| `{k}` | `{json.dumps(v)}` |")
    lines += ["", "## Inputs", "", "| role | name | path | id | revision / source | fingerprint (sha256) |",
              "|---|---|---|---|---|---|"]
    for d in x.get("inputs") or []:
        rev = d.get("revision") or d.get("source") or ""
        if isinstance(rev, dict):
            rev = ", ".join(f"{k}: {v}" for k, v in rev.items() if v not in (None, ""))
        lines.append(f"| {d['role']} | {d['name']} | `{d['path']}` | {d.get('model_id') or ''} | {rev} "
                     f"| `{d['fingerprint']}` |")
    if x.get("align"):
        lines += ["", "Alignment (permutation maps applied to experts before merging):", ""]
        for k, v in x["align"].items():
            lines.append(f"- expert {k}: `{v['path']}` (sha256 `{v['sha256']}`)")
    if x.get("data_statistics"):
        lines += ["", "Statistics of the stats stage the method read (per expert):", ""]
        lines += [f"- {name}: `{v['path']}` (stats id `{v['uid']}`)" for name, v in x["data_statistics"].items()]
    if x.get("calibration"):
        lines += ["", f"Calibration data the method ran the models on (per expert; {x.get('calibration_settings')}):", ""]
        lines += [f"- {name}: `{v['path']}` (uid `{v['uid']}`)" for name, v in x["calibration"].items()]
    if x.get("method_info"):
        lines += ["", f"Method facts: `{json.dumps(x['method_info'])[:2000]}`"]
    lines += ["", "## Output", "",
              f"- dtype: {x['dtype']} (computed in float32 on {x['device']})",
              f"- tensors: {x['num_tensors']}, parameters: {x['num_parameters']:,}",
              f"- vocabulary policy: {x['vocab_policy']}",
              f"- fingerprint (sha256 of config and weights): `{record.fingerprint}`",
              f"- merge time: {record.runtime_s} s, peak RSS: {record.peak_rss_mb} MB"]
    if x.get("statistics"):
        lines.append(f"- whole-model statistics: `{x['statistics']}`")
    lines += ["", "## Versions", ""]
    for k, v in record.versions.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Reproduce", "", "```yaml", equivalent_yaml(record).rstrip(), "```", "",
              "```bash", "mergesweep merge --config merge.yaml --out OUT_DIR", "```", ""]
    return "\n".join(lines)
