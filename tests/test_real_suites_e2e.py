"""A sweep as a MergeBench user runs it, end to end on local stand-ins for the Hub: a base and two
hub experts (fetched from a Hugging Face cache laid out here), lm-eval suites only (tasks over
local datasets, fetched into a datasets cache by the prefetch rule), no embedded skill.

Checked: no embedded-suite job is planned or run; every lm-eval suite has a validation and a test
split in the scores table; each expert's suite is a domain suite, the other one is held out; and
the leaderboard's selection is exactly the validation argmax recomputed here from the scores
table, independently of the aggregation code."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers_lm_eval import WITH_VALIDATION, WITHOUT_VALIDATION, build_lm_eval_tasks
from helpers_pipeline import REPO, tiny_eval_model
from test_fetch import make_hub_cache


def _expert_from(base, out, seed):
    """The base with seeded noise on every weight: an 'expert' that scores differently."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    (out / "mergesweep.json").unlink()
    g = torch.Generator().manual_seed(seed)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        noisy = {k: (v + 0.05 * v.std() * torch.randn(v.shape, generator=g)).contiguous() for k, v in tensors.items()}
        save_file(noisy, f, metadata={"format": "pt"})
    return out


def prepare(tmp: Path) -> dict:
    """The models (a base, two hub experts in a local Hugging Face cache), the local lm-eval tasks
    and the workflow config, under ``tmp``; what :func:`execute` runs."""
    base = tiny_eval_model(tmp / "zoo", ["arithmetic", "reverse"], "base", train=40)
    tasks = build_lm_eval_tasks(tmp / "lm_eval")
    cache = tmp / "hub"
    experts = []
    for i, (name, domain) in enumerate([("sums-expert", "sums"), ("pairs-expert", "pairs")]):
        src = _expert_from(base, tmp / "zoo" / name, seed=i + 1)
        make_hub_cache(cache, f"org/{name}", src)
        experts.append({"name": name, "domain": domain,
                        "source": {"type": "hub", "repo_id": f"org/{name}", "revision": "main",
                                   "offline": True, "cache_dir": str(cache)}})
    cfg = {
        "name": "real-suites",
        "base": {"name": "tiny-base", "source": {"type": "local", "path": str(base)}},
        "experts": experts,
        "suites": {"lm_eval": {"sums": [WITH_VALIDATION], "pairs": {"tasks": [WITHOUT_VALIDATION],
                                                                     "validation": {"size": tasks.slice_size}},
                               "general": {"tasks": [tasks.group], "validation": {"size": tasks.slice_size}}}},
        "merges": [{"method": "task_arithmetic", "params": {"lambda": [0.4, 1.0]}},
                   # data-aware: each expert's Gram matrices on its lm-eval domain's validation examples
                   {"method": "regmean", "params": {}}],
        "stats": {"examples": 16, "max_length": 32, "device": "cpu"},
        "evaluation": {"batch_size": 8, "device": "cpu", "include_paths": [str(tasks.include_path)]},
        "threads": 1,
    }
    work = tmp / "run"
    work.mkdir()
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return {"dir": work, "tasks": tasks, "cfg": cfg, "datasets": tmp / "datasets"}


def execute(prepared: dict) -> subprocess.CompletedProcess:
    """The sweep through a real ``snakemake`` process."""
    work = prepared["dir"]
    env = {**os.environ, "HF_DATASETS_CACHE": str(prepared["datasets"]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2",
                           "--directory", str(work), "--configfile", str(work / "cfg.yaml")],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import early, scheduled

    if scheduled("real suites run"):  # run by a background lane (tests/conftest.py) ...
        got = early("real suites run")
    else:  # ... or here
        got = prepare(tmp_path_factory.mktemp("real_suites"))
        got["proc"] = execute(got)
    proc = got["proc"]
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"dir": got["dir"], "proc": proc, "tasks": got["tasks"], "cfg": got["cfg"]}


def test_no_embedded_suite_is_planned_or_run(run):
    out = run["proc"].stdout + run["proc"].stderr
    ran = set(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", out, re.M))
    assert {"fetch", "prefetch_datasets", "merge", "evaluate", "evaluate_merged", "leaderboard"} <= ran, ran
    assert not {"make_data", "pretrain_base", "finetune"} & ran
    assert not (run["dir"] / "resources" / "data").exists()
    manifest = json.loads((run["dir"] / "results" / "datasets.json").read_text())
    assert {WITH_VALIDATION, WITHOUT_VALIDATION} <= set(manifest["tasks"])


def test_lm_eval_suites_have_validation_and_test(run):
    scores = pd.read_parquet(run["dir"] / "results" / "tables" / "scores.parquet")
    ok = scores[scores["status"] == "ok"]
    assert set(ok["suite"]) == {"sums", "pairs", "general"}
    for suite in ("sums", "pairs", "general"):
        assert set(ok.loc[ok["suite"] == suite, "split"]) == {"validation", "test"}, suite
    roles = scores.drop_duplicates("suite").set_index("suite")["suite_role"].to_dict()
    assert roles == {"sums": "skill", "pairs": "skill", "general": "heldout"}
    # the slice-based validation of the task without one: `size` examples, the rest is test
    pairs = ok[(ok["lm_eval_task"] == WITHOUT_VALIDATION) & (ok["metric"] == "acc")]
    n = pairs.groupby("split")["n"].first().to_dict()
    total = run["tasks"].sizes[WITHOUT_VALIDATION]["test"]
    assert n == {"validation": run["tasks"].slice_size, "test": total - run["tasks"].slice_size}


def test_selection_is_the_validation_argmax(run):
    """Recompute, from scores.parquet alone, each task-arithmetic point's mean normalised score on
    the validation split (acc, macro over a suite's tasks, divided by the domain expert's) and
    check the leaderboard selected its argmax."""
    res = run["dir"] / "results"
    scores = pd.read_parquet(res / "tables" / "scores.parquet")
    ok = scores[(scores["status"] == "ok") & (scores["metric"] == "acc") & (scores["filter"] == "none")]
    val = ok[ok["split"] == "validation"].groupby(["model_id", "suite"])["value"].mean()
    expert = {"sums": "sums-expert", "pairs": "pairs-expert"}
    ta = scores.loc[scores["method"] == "task_arithmetic", "model_id"].unique()
    assert len(ta) == 2
    norm = {m: sum(val[(m, d)] / val[(e, d)] for d, e in expert.items()) / 2 for m in ta}
    best = max(norm.values())
    want = sorted(m for m, v in norm.items() if v == best)[0]
    sel = pd.read_parquet(res / "tables" / "selection.parquet")
    row = sel[sel["method"] == "task_arithmetic"].iloc[0]
    assert row["selected_model_id"] == want
    assert row["val_norm_mean"] == pytest.approx(best, abs=1e-9)
    # the report ranks on test: its test mean is the same formula on the test split
    test = ok[ok["split"] == "test"].groupby(["model_id", "suite"])["value"].mean()
    test_norm = sum(test[(want, d)] / test[(e, d)] for d, e in expert.items()) / 2
    assert row["test_norm_mean"] == pytest.approx(test_norm, abs=1e-9)


def test_regmean_reads_each_experts_validation_examples_never_test(run):
    """The lm-eval domains' calibration data is their validation split as the evaluation scores it
    (the real calibration_data -> stats -> merge chain), and the merge reaches the tables."""
    import json

    res = run["dir"] / "results"
    data = run["tasks"].data_dir
    for suite in ("sums", "pairs"):
        recs = [json.loads(x) for x in (res / "calibration" / f"{suite}.jsonl").read_text().splitlines()]
        sizes = run["tasks"].sizes
        assert len(recs) == min(16, sizes["ms_lm_sums"]["validation"] if suite == "sums" else run["tasks"].slice_size)
        evaluated = json.loads(next((res / "evals").glob(f"*/{suite}.json")).read_text())["splits"]
        for task, plan in evaluated.items():
            if plan["rule"] == "seeded_slice":  # the pairs slice: exactly the validation docs
                pairs = [json.loads(x) for x in (data / "pairs/test.jsonl").read_text().splitlines()]
                assert sorted(r["prompt"] for r in recs) == sorted(pairs[i]["question"]
                                                                  for i in plan["validation"]["indices"])
            else:  # the task's own validation split, in its order (its test split is another file)
                val = [json.loads(x) for x in (data / "sums/validation.jsonl").read_text().splitlines()]
                assert [(r["prompt"], r["target"]) for r in recs] == \
                    [(d["question"], " " + d["choices"][d["label"]]) for d in val][:len(recs)]
    stats = sorted((res / "stats").iterdir())
    assert [p.name.split("--")[:2] for p in stats] == [["pairs-expert", "gram"], ["sums-expert", "gram"]]
    for p in stats:
        rec = json.loads((p / "stats.json").read_text())
        assert rec["data"]["path"].endswith(f"results/calibration/{p.name.split('-')[0]}.jsonl")
    scores = pd.read_parquet(res / "tables" / "scores.parquet")
    rm = scores[(scores["method"] == "regmean") & (scores["split"] == "test")]
    assert set(rm["suite"]) == {"sums", "pairs", "general"} and (rm["status"] == "ok").all()
