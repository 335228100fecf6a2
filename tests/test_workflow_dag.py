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
    # one evaluation job per model (every suite in it): 1 base + 3 experts, 10 merged models
    assert int(jobs["evaluate"]) == 4 and int(jobs["evaluate_merged"]) == 10, jobs
    assert int(jobs["merge"]) == 10 and len({m for m in re.findall(r"^rule merge:", out, re.M)}) == 1
    # regmean's Gram matrices and fisher's Fisher, once per expert
    assert int(jobs["stats"]) == 6, jobs
    # the disk a sweep needs, before it starts
    assert re.search(r"disk: 10 merged model\(s\) x 0\.54 GB = 5\.38 GB kept \(keep_models: all\)", proc.stderr) \
        or "base not fetched yet" in proc.stderr, proc.stderr[-2000:]


def test_per_suite_jobs_are_an_option(tmp_path):
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    cfg["evaluation"]["jobs"] = "per_suite"
    proc = dry_run(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.M))
    # 4 suites x (1 base + 3 experts) and 4 suites x 3 merged models
    assert int(jobs["evaluate"]) == 16 and int(jobs["evaluate_merged"]) == 12, jobs
    assert "logs/evaluate_suite/tiny-base/capitals.log" in proc.stdout


def _resources(stdout: str) -> dict:
    """rule -> the resources of its first job in a dry run's listing."""
    out = {}
    for block in re.split(r"\n(?=\[.*\]\n(?:local)?rule )", stdout):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        r = re.search(r"^\s+resources: (.*)$", block, re.M)
        t = re.search(r"^\s+threads: (\d+)$", block, re.M)
        if m and r and m.group(1) not in out:
            res = dict(kv.split("=", 1) for kv in r.group(1).split(", "))
            res["threads"] = t.group(1) if t else "1"
            out[m.group(1)] = res
    return out


def test_rules_ask_for_what_their_stage_uses(tmp_path):
    """GPUs follow the stages' devices (auto: training and evaluation ask for one, merge does
    not; cpu: none); time and memory grow with the base's size; config overrides win."""
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    res = _resources(dry_run(tmp_path, cfg).stdout)
    assert res["pretrain_base"]["gpu"] == "1" and res["finetune"]["gpu"] == "1" and res["evaluate"]["gpu"] == "1"
    assert res["make_data"]["gpu"] == "0" and res["merge"]["gpu"] == "0" and res["aggregate"]["gpu"] == "0"
    assert res["merge"]["threads"] == "1" and res["finetune"]["threads"] == str(cfg["threads"])
    tiny_eval_runtime = int(res["evaluate"]["runtime"])

    cfg["evaluation"]["device"] = "cpu"
    cfg["training"] = {"device": "cpu"}
    cfg["merge"]["device"] = "cuda"
    cfg["resources"] = {"merge": {"runtime": 7, "threads": 2}, "finetune": {"mem_mb": 1234}}
    res = _resources(dry_run(tmp_path, cfg).stdout)
    assert res["evaluate"]["gpu"] == "0" and res["finetune"]["gpu"] == "0" and res["merge"]["gpu"] == "1"
    assert res["merge"]["runtime"] == "7" and res["merge"]["threads"] == "2"  # (dry run: at most --cores)
    assert res["finetune"]["mem_mb"] == "1234"

    # the default's base (SmolLM2, 135M parameters) asks for more time than the tiny one
    default = _resources(dry_run(tmp_path / "default").stdout)
    assert int(default["evaluate"]["runtime"]) > tiny_eval_runtime


@pytest.mark.parametrize("resources, message", [
    ({"merge": {"gpu": 1}}, "resources.merge.gpu: 1, but merge.device is"),
    ({"make_data": {"gpu": 1}}, "resources.make_data.gpu: 1, but the make_data stage runs on CPU only"),
    ({"evaluate": {"gpus": 1}}, "resources.evaluate.gpus: unknown key"),
    ({"merge": {"runtime": 0}}, "resources.merge.runtime"),
])
def test_bad_resources_are_named(tmp_path, resources, message):
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    cfg["merge"]["device"] = "cpu"
    cfg["resources"] = resources
    proc = dry_run(tmp_path, cfg)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]


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


def test_config_values_lay_over_the_default(tmp_path):
    """`--config keep_models=selected` (what the SLURM profile sets) keeps the embedded default
    and changes only that key; the dry run says what the sweep keeps on disk."""
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--config", "keep_models=selected"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.M))
    assert int(jobs["merge"]) == 10 and jobs["fetch"] == "1", jobs  # still the default's sweep
    assert re.search(r"10 merged model\(s\) x .*removed once evaluated \(keep_models: selected\), 9 kept", proc.stderr), \
        proc.stderr[-2000:]
