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
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    cfg["suites"]["lm_eval"] = {"math": "mergebench_math", "code": "mergebench_coding",
                                "multilingual": "mergebench_multilingual", "olb": "open_llm_leaderboard_v2"}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n", "-p",
                           "--cores", "2", "--directory", str(tmp_path), "--configfile", str(p)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "--lm-eval-tasks gsm8k_cot --num-fewshot 8" in out
    assert "--lm-eval-tasks mbpp_plus humaneval_plus --confirm-run-unsafe-code" in out
    assert "results/evals/tiny-base/multilingual.json" in out
