"""Registered real-benchmark suites resolve to tasks lm-eval knows; the DAG builds with them;
per-suite evaluation settings reach the spec, and bad ones are refused naming the key."""

import subprocess
import sys

import pytest
import yaml

from mergesweep.errors import ConfigError
from mergesweep.evaluate.suites import REGISTERED, resolve
from helpers_pipeline import REPO


@pytest.fixture(scope="module")
def lm_eval_tasks():
    """lm-eval's whole task index (TaskManager(): 12-30 s to build) through the evaluation's own
    per-process cache, so the session builds it once (tests/test_evaluate_failures.py's unknown-task
    test asks for the same index)."""
    from mergesweep.evaluate.runner import lm_eval_task_manager

    return set(lm_eval_task_manager().all_tasks)


def test_every_preset_task_exists_in_lm_eval(lm_eval_tasks):
    """Every task of every suite the presets under config/presets name is one lm-eval indexes."""
    from mergesweep.config import load_config_file
    from mergesweep.plan import build_plan

    presets = sorted((REPO / "config" / "presets").glob("*.yaml"))
    assert len(presets) >= 3
    for path in presets:
        plan = build_plan(load_config_file(path))
        missing = {t for s in plan.lm_eval_suites.values() for t in s.tasks} - lm_eval_tasks
        assert not missing, f"{path.name}: lm-eval has no task {sorted(missing)}"


def test_every_registered_task_exists_in_lm_eval(lm_eval_tasks):
    for suite in REGISTERED.values():
        missing = [t for t in suite.tasks if t not in lm_eval_tasks]
        assert not missing, (suite.name, missing)
    mb = REGISTERED["mergebench_multilingual"].tasks
    assert len(mb) == 12 and "m_mmlu_ru" in mb and "hellaswag_fr" in mb
    assert REGISTERED["mergebench_math"].num_fewshot == 8
    assert REGISTERED["mergebench_coding"].unsafe_code
    safety = REGISTERED["lm_eval_safety"]
    assert set(safety.tasks) == {"toxigen", "truthfulqa_mc2", "crows_pairs_english", "bbq"}
    assert "not lm-eval tasks" in safety.description and not safety.unsafe_code


def test_resolve_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"suites.lm_eval.x: unknown registered suite 'nope'"):
        resolve("x", "nope")
    assert resolve("mine", ["arc_easy"]).tasks == ("arc_easy",)
    s = resolve("math", {"suite": "mergebench_math", "dtype": "bfloat16", "validation": {"size": 50}})
    assert (s.tasks, s.num_fewshot, s.dtype, s.validation) == (("gsm8k_cot",), 8, "bfloat16", {"size": 50})
    s = resolve("mine", {"tasks": ["arc_easy"], "num_fewshot": 0, "apply_chat_template": True, "limit": 5,
                         "batch_size": "auto:2"})
    assert (s.num_fewshot, s.apply_chat_template, s.limit, s.batch_size, s.dtype) == (0, True, 5, "auto:2", None)


def _tiny_cfg():
    return yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())


@pytest.mark.parametrize("lm_eval, evaluation, pattern", [
    ({"math": {"suite": "mergebench_math", "num_fewshot": -1}}, {},
     r"^suites\.lm_eval\.math\.num_fewshot: -1 is less than the minimum of 0"),
    ({"math": {"suite": "mergebench_math", "dtype": "float64"}}, {}, r"^suites\.lm_eval\.math\.dtype: 'float64'"),
    ({"math": {"tasks": ["gsm8k"], "batch_size": "lots"}}, {}, r"^suites\.lm_eval\.math\.batch_size: 'lots'"),
    ({"math": {"tasks": ["gsm8k"], "limit": 0}}, {}, r"^suites\.lm_eval\.math\.limit: 0 is less than"),
    ({"math": {"tasks": ["gsm8k"], "validation": {"size": 0}}}, {}, r"^suites\.lm_eval\.math\.validation\.size: 0"),
    ({"math": {"tasks": ["gsm8k"], "validation": {"sizes": 3}}}, {},
     r"^suites\.lm_eval\.math\.validation\.sizes: unknown key"),
    ({"math": {"tasks": ["gsm8k"], "apply_chat_template": "yes"}}, {},
     r"^suites\.lm_eval\.math\.apply_chat_template: 'yes' is not of type 'boolean'"),
    ({"math": {"tasks": ["gsm8k"], "fewshot": 3}}, {}, r"^suites\.lm_eval\.math\.fewshot: unknown key"),
    ({"math": {"tasks": ["gsm8k"], "suite": "mergebench_math"}}, {},
     r"^suites\.lm_eval\.math: .* \(expected exactly one of 'tasks'"),
    ({"math": {"suite": "nope"}}, {}, r"^suites\.lm_eval\.math: unknown registered suite 'nope'"),
    ({"math": 3}, {}, r"^suites\.lm_eval\.math: 3 is not valid"),
    ({}, {"dtype": "fp8"}, r"^evaluation\.dtype: 'fp8'"),
    ({}, {"num_fewshot": -2}, r"^evaluation\.num_fewshot: -2"),
    ({}, {"validation": {"size": 0}}, r"^evaluation\.validation\.size: 0"),
    ({}, {"include_paths": ["/no/such/dir"]}, r"^evaluation\.include_paths\[0\]: directory /no/such/dir not found"),
])
def test_bad_settings_name_the_key(lm_eval, evaluation, pattern):
    import re

    from mergesweep.plan import build_plan

    cfg = _tiny_cfg()
    cfg["suites"]["lm_eval"] = lm_eval
    cfg["evaluation"].update(evaluation)
    with pytest.raises(ConfigError) as e:
        build_plan(cfg)
    assert re.search(pattern, str(e.value)), str(e.value)


def test_settings_reach_the_spec_and_the_evaluation(tmp_path):
    """Producer and consumer: the plan's spec carries the global settings as options and each
    suite's own; the evaluation job reads them back and a suite's own value wins."""
    import json

    from mergesweep.evaluate.runner import read_spec
    from mergesweep.plan import build_plan

    cfg = _tiny_cfg()
    cfg["seed"] = 5
    cfg["suites"]["lm_eval"] = {
        "math": {"suite": "mergebench_math", "dtype": "bfloat16", "validation": {"size": 40}},
        "safety": "lm_eval_safety", "mine": {"tasks": ["arc_easy"], "limit": 9, "batch_size": 2,
                                             "apply_chat_template": True}}
    cfg["evaluation"].update({"dtype": "float16", "num_fewshot": 3, "include_paths": [str(tmp_path)],
                              "validation": {"size": 30}})
    p = tmp_path / "evaluation.json"
    p.write_text(json.dumps(build_plan(cfg).eval_spec_doc()))
    runs, options = read_spec(p)
    assert options["include_paths"] == [str(tmp_path)] and options["validation"] == {"size": 30, "seed": 5}
    by = {r.name: r.settings(options) for r in runs}
    assert by["math"] == {"dtype": "bfloat16", "apply_chat_template": False, "num_fewshot": 8,
                          "limit": None, "batch_size": options["batch_size"], "validation": {"size": 40, "seed": 5}}
    assert by["safety"]["dtype"] == "float16" and by["safety"]["num_fewshot"] == 3
    assert by["safety"]["validation"] == {"size": 30, "seed": 5}
    assert (by["mine"]["limit"], by["mine"]["batch_size"], by["mine"]["apply_chat_template"]) == (9, 2, True)
    assert by["arithmetic"]["validation"] is None and by["arithmetic"]["dtype"] == "float16"


def test_dag_builds_with_mergebench_and_leaderboard_suites(tmp_path):
    """The DAG plans every lm-eval suite into each model's evaluation job, and the spec the
    workflow writes (the real rule, run here) hands the evaluation the suites' exact task names,
    few-shot counts and the unsafe-code confirmation."""
    from mergesweep.evaluate.runner import read_spec

    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    cfg["suites"]["lm_eval"] = {"math": "mergebench_math", "code": "mergebench_coding",
                                "multilingual": "mergebench_multilingual", "olb": "open_llm_leaderboard_v2"}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1",
           "--directory", str(tmp_path)]
    proc = subprocess.run([*cmd, "-n", "-p", "--configfile", str(p)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "results/evals/tiny-base/multilingual.json" in out and "results/evals/tiny-base/olb.json" in out
    # the datasets are fetched once, by a local rule, before the evaluation jobs
    assert "prefetch-datasets --spec results/evaluation.json --out results/datasets.json" in out
    proc = subprocess.run([*cmd, "results/evaluation.json", "--configfile", str(p)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r.name: r for r in read_spec(tmp_path / "results/evaluation.json")[0]}
    assert runs["math"].lm_eval_tasks == ("gsm8k_cot",) and runs["math"].num_fewshot == 8
    assert runs["code"].lm_eval_tasks == ("mbpp_plus", "humaneval_plus") and runs["code"].unsafe_code
    assert not runs["olb"].unsafe_code and runs["olb"].lm_eval_tasks == ("leaderboard",)
