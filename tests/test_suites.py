"""Registered real-benchmark suites resolve to tasks lm-eval knows; the DAG builds with them."""

import subprocess
import sys

import pytest
import yaml

from mergesweep.errors import ConfigError
from mergesweep.evaluate.suites import REGISTERED, resolve
from helpers_pipeline import REPO


@pytest.fixture(scope="module")
def lm_eval_tasks():
    from lm_eval.tasks import TaskManager

    return set(TaskManager().all_tasks)


def test_every_registered_task_exists_in_lm_eval(lm_eval_tasks):
    for suite in REGISTERED.values():
        missing = [t for t in suite.tasks if t not in lm_eval_tasks]
        assert not missing, (suite.name, missing)
    mb = REGISTERED["mergebench_multilingual"].tasks
    assert len(mb) == 12 and "m_mmlu_ru" in mb and "hellaswag_fr" in mb
    assert REGISTERED["mergebench_math"].num_fewshot == 8
    assert REGISTERED["mergebench_coding"].unsafe_code


def test_resolve_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"suites.lm_eval.x: unknown registered suite 'nope'"):
        resolve("x", "nope")
    assert resolve("mine", ["arc_easy"]).tasks == ("arc_easy",)


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
    proc = subprocess.run([*cmd, "results/evaluation.json", "--configfile", str(p)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r.name: r for r in read_spec(tmp_path / "results/evaluation.json")[0]}
    assert runs["math"].lm_eval_tasks == ("gsm8k_cot",) and runs["math"].num_fewshot == 8
    assert runs["code"].lm_eval_tasks == ("mbpp_plus", "humaneval_plus") and runs["code"].unsafe_code
    assert not runs["olb"].unsafe_code and runs["olb"].lm_eval_tasks == ("leaderboard",)
