"""The seam between the stats stage and the merge engine, with the real producer and consumer:
``mergesweep stats`` writes each expert's statistics, ``mergesweep merge`` reads them for every
tensor they belong to (not a fallback everywhere because keys drifted), checks they are of the
very expert merged, and hashes their identity into the model id."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml

from helpers_merge import make_base, make_expert, read_state
from mergesweep.cli import main
from mergesweep.merge.config import load_merge_yaml, planned_model_id
from mergesweep.merge.context import TensorContext
from mergesweep.merge.methods import REGISTRY
from mergesweep.merge.spec import resolve_params
from mergesweep.stats.io import StatsReader

LINEAR = "model.layers.1.mlp.down_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mergesweep.align.toy import char_tokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("contract")
    base = make_base(root / "base", seed=1)
    char_tokenizer().save_pretrained(base)
    experts = []
    for i, text in enumerate(["abc abd abe ", "xyz xzy yxz "]):
        e = make_expert(base, root / f"e{i}", seed=10 + i, scale=0.05)
        char_tokenizer().save_pretrained(e)
        data = root / f"d{i}.jsonl"
        data.write_text("".join(json.dumps({"text": text * (j + 1)}) + "\n" for j in range(6)))
        stats = {}
        for kind in ("gram", "fisher"):
            out = root / f"s{i}-{kind}"
            assert main(["stats", "--model", str(e), "--data", str(data), "--kind", kind, "--examples", "6",
                         "--max-length", "32", "--batch-size", "3", "--device", "cpu", "--uid", f"e{i}--{kind}--t",
                         "--out", str(out), "--no-progress"]) == 0
            stats[kind] = out
        experts.append({"dir": e, "data": data, "stats": stats})
    return root, base, experts


def _merge(root, base, experts, method, kind, params=None, name="m", stats=None):
    doc = {"method": method, "base": str(base), "experts": [str(e["dir"]) for e in experts],
           "expert_names": ["a", "b"], "params": params or {}, "device": "cpu",
           "stats": stats or {n: str(e["stats"][kind]) for n, e in zip("ab", experts)}}
    y = root / f"{name}.yaml"
    y.write_text(yaml.safe_dump(doc))
    out = root / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    rc = main(["merge", "--config", str(y), "--out", str(out)])
    return rc, y, out


def _kernel(method, kind, tensors, readers, name, params=None):
    """The method's kernel on one tensor, with the statistics read straight from the files."""
    spec = REGISTRY[method]
    kp, _ = resolve_params(spec, params or {}, 2)
    ctx = TensorContext(name, 2)
    ctx.expert_stats = {kind: [r.get(kind, name) for r in readers]}
    if kind == "gram":
        ctx.expert_stats["gram_count"] = [None if r.count(name) is None else torch.tensor([r.count(name)])
                                          for r in readers]
    if spec.statistics:  # global quantities (Fisher's norm): over the whole model, from the files
        for req in spec.requests(kp, 2):
            assert req.kind == "sum"
            ctx.stats[req.key] = [float(sum((r.get(kind, k) ** 2).sum(dtype=torch.float64) for k in r.names(kind)))
                                  for r in readers]
    return spec.merge(tensors[0], tensors[1:], kp, ctx)


@pytest.mark.parametrize("method,kind", [("regmean", "gram"), ("fisher", "fisher")])
def test_merge_reads_each_tensors_statistics_from_the_stats_stage(setup, method, kind):
    root, base, experts = setup
    params = {"fisher_target": "labels"} if method == "fisher" else {}
    rc, y, out = _merge(root, base, experts, method, kind, params, name=method)
    assert rc == 0
    rec = json.loads((out / "mergesweep.json").read_text())
    assert planned_model_id(load_merge_yaml(y)) == rec["model_id"]
    merged, b = read_state(out), read_state(base)
    es = [read_state(e["dir"]) for e in experts]
    readers = [StatsReader(e["stats"][kind]) for e in experts]
    for name in (LINEAR, NORM):
        want = _kernel(method, kind, [b[name]] + [e[name] for e in es], readers, name, params)
        torch.testing.assert_close(merged[name], want, atol=1e-5, rtol=1e-5)
    average = (es[0][LINEAR] + es[1][LINEAR]) / 2
    assert (merged[LINEAR] - average).abs().max() > 1e-4  # the statistics were used, not a fallback
    assert rec["data_statistics"]["a"]["uid"] == "e0--" + kind + "--t"


def _refused(caplog, pattern, *args, **kw):
    caplog.clear()
    rc, _, out = _merge(*args, **kw)
    assert rc != 0 and not out.exists()
    assert re.search(pattern, caplog.text), caplog.text


def test_statistics_change_the_id_and_bad_statistics_name_the_file(setup, caplog):
    root, base, experts = setup
    rc, y, out = _merge(root, base, experts, "regmean", "gram", name="ok")
    first = json.loads((out / "mergesweep.json").read_text())["model_id"]
    swapped = {"a": str(experts[1]["stats"]["gram"]), "b": str(experts[0]["stats"]["gram"])}
    # another expert's statistics: refused, naming the record
    _refused(caplog, r"statistics of expert 0 \(a\): .*s1-gram/stats.json was computed on model .*not on",
             root, base, experts, "regmean", "gram", stats=swapped, name="swapped")
    # the wrong kind for the method
    _refused(caplog, r"s0-fisher has no 'gram' statistics \(it has: fisher\)", root, base, experts, "regmean",
             "gram", stats={"a": str(experts[0]["stats"]["fisher"]), "b": str(experts[1]["stats"]["gram"])}, name="k")
    # statistics recomputed with another id: another merge
    other = root / "s0-gram-other"
    assert main(["stats", "--model", str(experts[0]["dir"]), "--data", str(experts[0]["data"]), "--kind", "gram",
                 "--examples", "3", "--max-length", "32", "--device", "cpu", "--uid", "e0--gram--u",
                 "--out", str(other), "--no-progress"]) == 0
    rc, _, out2 = _merge(root, base, experts, "regmean", "gram",
                         stats={"a": str(other), "b": str(experts[1]["stats"]["gram"])}, name="other")
    assert json.loads((out2 / "mergesweep.json").read_text())["model_id"] != first
    # a statistics directory without its record
    broken = root / "broken"
    shutil.copytree(experts[0]["stats"]["gram"], broken, dirs_exist_ok=True)
    (broken / "stats.json").unlink()
    _refused(caplog, r"broken/stats.json: statistics record not found", root, base, experts, "regmean", "gram",
             stats={"a": str(broken), "b": str(experts[1]["stats"]["gram"])}, name="broken")


def test_model_card_reproduces_a_data_aware_merge(setup):
    """The card's YAML (stats directories included) is a merge config with the same model id."""
    root, base, experts = setup
    rc, _, out = _merge(root, base, experts, "regmean", "gram", name="card")
    assert rc == 0
    card = (out / "README.md").read_text()
    assert "stats id `e0--gram--t`" in card
    text = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    y = root / "from-card.yaml"
    y.write_text(text)
    assert planned_model_id(load_merge_yaml(y)) == json.loads((out / "mergesweep.json").read_text())["model_id"]
