"""The DAG builds (snakemake -n) for the default and tiny configs; bad configs stop early with
the key named."""

import re
import subprocess
import sys

import pytest
import yaml

from helpers_pipeline import REPO

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n", "--cores", "2"]


def dry_run(tmp_path, config=None):
    cmd = [*SNAKEMAKE, "--directory", str(tmp_path)]
    if config is not None:
        p = tmp_path / "cfg.yaml"
        p.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(p)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_default_config_dag(tmp_path):
    proc = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))
    assert jobs["fetch"] == "1" and jobs["finetune"] == "3" and jobs["leaderboard"] == "1", jobs
    # 4 suites x (1 base + 3 experts + 3 merges)
    assert int(jobs["evaluate"]) == 16 and int(jobs["evaluate_merged"]) == 12, jobs


def test_tiny_config_dag(tmp_path):
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    proc = dry_run(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.M))
    assert jobs["pretrain_base"] == "1" and "fetch" not in jobs, jobs


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.pop("experts"), "experts"),
    (lambda c: c["finetune"].update(steps=0), "steps"),
    (lambda c: c["suites"].update(skills=["juggling"]), "juggling"),
    (lambda c: c["merges"].append({"method": "frobnicate"}), "merges[2].method: unknown merge method 'frobnicate'"),
])
def test_bad_config_is_named(tmp_path, mutate, expected):
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    mutate(cfg)
    proc = dry_run(tmp_path, cfg)
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))


def test_aligned_merge_adds_align_and_lmc_jobs(tmp_path):
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    cfg["merges"].append({"method": "task_arithmetic", "params": {"lambda": 1.0},
                          "align": {"method": "weight_matching", "reference": "base"}})
    proc = dry_run(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for expert in ("tiny-arithmetic", "tiny-reverse", "tiny-dateformat"):
        assert f"results/align/{expert}--tiny-base--weight_matching/perm.safetensors" in out
        assert f"results/lmc/{expert}--tiny-base--weight_matching.json" in out
    assert "results/tables/lmc.parquet" in out
