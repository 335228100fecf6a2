"""One evaluation job per model: ``mergesweep evaluate --spec`` loads the model once and runs every
suite; it writes the same per-suite JSON values as one job per (model, suite); one suite's
failure is recorded for that suite only; a bad spec or a mismatched ``--out`` list is refused
before anything is loaded or written. The spec comes from the real producer (the plan).

Real lm-eval, a real tiny Llama checkpoint with a tokenizer and record, real generated tasks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers_pipeline import tiny_eval_model
from mergesweep.cli import main

SUITES = ["arithmetic", "reverse"]
MODEL_ID = "tiny-eval"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("per_model")
    return {"root": root, "model": tiny_eval_model(root, SUITES, MODEL_ID, train=40)}


def write_spec(path: Path, tasks_root: Path, suites=SUITES, **options) -> Path:
    doc = {"suites": [{"name": s, "tasks_dir": str(tasks_root / s)} for s in suites],
           "options": {"batch_size": 4, "device": "auto", "limit": 3, "log_samples": False, **options}}
    path.write_text(json.dumps(doc))
    return path


def run(model, spec, outs, *extra) -> int:
    return main(["evaluate", "--model", str(model), "--spec", str(spec), *extra, "--threads", "1",
                 "--out", *map(str, outs)])


def values(out: Path) -> list[tuple]:
    doc = json.loads(out.read_text())
    assert doc["status"] == "ok", doc["error"]
    return [(r["lm_eval_task"], r["metric"], r["split"], r["value"], r["stderr"], r["n"]) for r in doc["results"]]


def test_per_model_equals_per_suite(tiny, tmp_path, one_torch_thread):
    """The same model, seeds and options: one job for both suites writes the values two
    one-suite jobs write; the model was loaded once (one load time shared by both JSONs)."""
    spec = write_spec(tmp_path / "spec.json", tiny["root"] / "tasks")
    together = [tmp_path / "together" / f"{s}.json" for s in SUITES]
    assert run(tiny["model"], spec, together) == 0
    apart = []
    for s in SUITES:
        out = tmp_path / "apart" / f"{s}.json"
        assert run(tiny["model"], spec, [out], "--suites", s) == 0
        apart.append(out)
    for a, b in zip(together, apart):
        va, vb = values(a), values(b)
        assert va and va == vb
        assert {r[2] for r in va} == {"validation", "test"} and all(r[5] == 3 for r in va)
    docs = [json.loads(p.read_text()) for p in together]
    assert [d["suite"] for d in docs] == SUITES
    assert docs[0]["load_s"] == docs[1]["load_s"]  # one load for the job
    assert docs[0]["device"] == "cpu" and docs[0]["requested_device"] == "auto"


def test_one_failing_suite_does_not_touch_the_others(tiny, tmp_path, one_torch_thread):
    import yaml

    tasks = tmp_path / "tasks"
    shutil.copytree(tiny["root"] / "tasks", tasks)
    y = tasks / "arithmetic" / "ms_arithmetic_test.yaml"
    doc = yaml.safe_load(y.read_text())
    doc["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / "missing.jsonl")
    y.write_text(yaml.safe_dump(doc))
    spec = write_spec(tmp_path / "spec.json", tasks)
    outs = [tmp_path / "evals" / f"{s}.json" for s in SUITES]
    assert run(tiny["model"], spec, outs) == 0  # recorded, not retried
    bad, good = (json.loads(p.read_text()) for p in outs)
    assert bad["status"] == "error" and "missing.jsonl" in bad["error"] and bad["results"] == []
    assert good["status"] == "ok" and values(outs[1])
    # --fail-on-error: exit 1, but both suites are still written
    outs2 = [tmp_path / "evals2" / f"{s}.json" for s in SUITES]
    assert run(tiny["model"], spec, outs2, "--fail-on-error") == 1
    assert json.loads(outs2[1].read_text())["status"] == "ok"


def _bad_json(tmp, tasks):
    p = tmp / "spec.json"
    p.write_text("{not json")
    return p, None


def _unknown_key(tmp, tasks):
    p = write_spec(tmp / "spec.json", tasks)
    doc = json.loads(p.read_text())
    doc["suites"][0]["taskdir"] = "x"
    p.write_text(json.dumps(doc))
    return p, None


def _duplicate(tmp, tasks):
    return write_spec(tmp / "spec.json", tasks, suites=["arithmetic", "arithmetic"]), None


def _unknown_option(tmp, tasks):
    p = write_spec(tmp / "spec.json", tasks)
    doc = json.loads(p.read_text())
    doc["options"]["batchsize"] = 4
    p.write_text(json.dumps(doc))
    return p, None


def _missing_tasks_dir(tmp, tasks):
    return write_spec(tmp / "spec.json", tmp / "nowhere"), None


def _pick_unknown(tmp, tasks):
    return write_spec(tmp / "spec.json", tasks), ["--suites", "capitals"]


def _cuda(tmp, tasks):
    return write_spec(tmp / "spec.json", tasks, device="cuda"), None


def _vllm_on_cpu(tmp, tasks):
    return write_spec(tmp / "spec.json", tasks, backend="vllm", device="cpu"), None


@pytest.mark.parametrize("case, pattern", [
    (_bad_json, r"--spec .*spec.json: cannot read"),
    (_unknown_key, r"suites\[0\]: unknown key\(s\) taskdir"),
    (_duplicate, r"suite 'arithmetic' appears twice"),
    (_unknown_option, r"options: unknown key\(s\) batchsize"),
    (_missing_tasks_dir, r"--tasks-dir .*nowhere/arithmetic: directory not found"),
    (_pick_unknown, r"--suites: capitals not in"),
    (_cuda, r"'cuda' requested but"),
    (_vllm_on_cpu, r"--backend vllm runs on a GPU, but the device is cpu"),
])
def test_bad_spec_is_refused_and_nothing_is_written(tiny, tmp_path, capsys, case, pattern):
    import re

    spec, extra = case(tmp_path, tiny["root"] / "tasks")
    outs = [tmp_path / "evals" / f"{s}.json" for s in SUITES]
    if extra:
        outs = outs[:1]
    rc = run(tiny["model"], spec, outs, *(extra or []))
    err = capsys.readouterr().err
    assert rc == 1
    lines = [l for l in err.splitlines() if l.startswith("mergesweep evaluate: error: ")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err[-1500:]
    assert not (tmp_path / "evals").exists()


def test_out_count_must_match_the_suites(tiny, tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.json", tiny["root"] / "tasks")
    rc = run(tiny["model"], spec, [tmp_path / "evals" / "arithmetic.json"])
    assert rc == 1
    assert "2 suite(s) (arithmetic, reverse) but 1 --out path(s)" in capsys.readouterr().err
    assert not (tmp_path / "evals").exists()


def test_the_plans_spec_is_what_evaluate_reads(tmp_path):
    """Producer and consumer: the spec the workflow writes from the plan (Plan.eval_spec_doc, the
    rule evaluation_spec) is read back by the evaluation job into the plan's suites, in order,
    with the config's options."""
    import yaml

    from mergesweep.evaluate.runner import read_spec
    from mergesweep.plan import build_plan

    cfg = yaml.safe_load(Path("config/presets/tiny.yaml").read_text())
    cfg["suites"]["lm_eval"] = {"math": "mergebench_math", "mine": ["arc_easy"]}
    cfg["evaluation"].update({"limit": 7, "device": "auto", "batch_size": "auto:2"})
    plan = build_plan(cfg)
    p = tmp_path / "evaluation.json"
    p.write_text(json.dumps(plan.eval_spec_doc()))
    runs, options = read_spec(p)
    assert [r.name for r in runs] == plan.suites
    by = {r.name: r for r in runs}
    assert by["math"].lm_eval_tasks == ("gsm8k_cot",) and by["math"].num_fewshot == 8
    assert by["mine"].lm_eval_tasks == ("arc_easy",) and by["mine"].tasks_dir is None
    assert str(by["arithmetic"].tasks_dir) == plan.layout.tasks("arithmetic")
    assert options["limit"] == 7 and options["device"] == "auto" and options["batch_size"] == "auto:2"
    assert options["backend"] == "hf"
