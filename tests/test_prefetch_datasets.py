"""`mergesweep prefetch-datasets` fetches the datasets of a spec's lm-eval tasks into the HF
datasets cache the user set (here a tmp dir), writes the manifest, and a following evaluation
runs offline (HF_DATASETS_OFFLINE=1) from that cache without adding to it; a dataset that cannot
be fetched is one line naming the task and the dataset, and no manifest is written.

Real lm-eval and datasets in subprocesses (the cache location is read when `datasets` is
imported), a local task directory over local JSON files (helpers_lm_eval), a real tiny Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers_lm_eval import GROUP, WITH_VALIDATION, WITHOUT_VALIDATION, build_lm_eval_tasks
from helpers_pipeline import REPO, tiny_eval_model


def spec(path: Path, tasks, names, **options) -> Path:
    path.write_text(json.dumps({
        "suites": [{"name": "local_mc", "lm_eval_tasks": names}],
        "options": {"batch_size": 4, "device": "cpu", "limit": 3, "include_paths": [str(tasks.include_path)],
                    "validation": {"size": 8, "seed": 0}, **options}}))
    return path


def mergesweep(*args, env: dict) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    e.update({"OMP_NUM_THREADS": "1", **env})
    return subprocess.run([sys.executable, "-m", "mergesweep", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=REPO)


def cache_files(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


def test_prefetch_fills_the_cache_and_the_offline_evaluation_uses_it(tmp_path):
    tasks = build_lm_eval_tasks(tmp_path / "lm_eval")
    model = tiny_eval_model(tmp_path, ["arithmetic"], "tiny-lm", train=20)
    cache = tmp_path / "hf_cache"
    s = spec(tmp_path / "evaluation.json", tasks, [GROUP])
    out = tmp_path / "results" / "datasets.json"
    proc = mergesweep("prefetch-datasets", "--spec", s, "--out", out, env={"HF_DATASETS_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(out.read_text())
    assert manifest["cache_dir"] == str(cache)
    assert set(manifest["tasks"]) == {WITH_VALIDATION, WITHOUT_VALIDATION}
    sums = manifest["tasks"][WITH_VALIDATION]
    assert sums["dataset_path"] == "json" and sums["dataset_name"] is None and sums["revision"] is None
    assert sums["splits"] == {"train": 8, "validation": 10, "test": 16} and sums["suites"] == ["local_mc"]
    assert sums["data_files"]["test"] == str((tasks.data_dir / "sums/test.jsonl").resolve())
    assert manifest["tasks"][WITHOUT_VALIDATION]["splits"] == {"test": 24}
    filled = cache_files(cache)
    assert any(f.endswith(".arrow") for f in filled), filled  # the datasets were built into the cache

    evals = tmp_path / "results" / "evals" / "local_mc.json"
    proc = mergesweep("evaluate", "--model", model, "--spec", s, "--threads", "1", "--out", evals,
                      env={"HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(evals.read_text())
    assert doc["status"] == "ok", doc["error"]
    assert {(r["lm_eval_task"], r["split"]) for r in doc["results"]} == {
        (t, s) for t in (WITH_VALIDATION, WITHOUT_VALIDATION) for s in ("validation", "test")}
    arrow = {f for f in filled if f.endswith(".arrow")}
    assert {f for f in cache_files(cache) if f.endswith(".arrow")} == arrow  # read from the cache, nothing rebuilt


def test_an_unfetchable_dataset_names_task_and_dataset_and_writes_nothing(tmp_path):
    from mergesweep.cli import main

    tasks = build_lm_eval_tasks(tmp_path / "lm_eval", broken=True)
    s = spec(tmp_path / "evaluation.json", tasks, [tasks.broken])
    out = tmp_path / "results" / "datasets.json"
    proc = mergesweep("prefetch-datasets", "--spec", s, "--out", out,
                      env={"HF_DATASETS_CACHE": str(tmp_path / "hf_cache")})
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mergesweep prefetch-datasets: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    missing = str((tasks.data_dir / "missing" / "test.jsonl").resolve())
    assert f"task {tasks.broken}: cannot fetch dataset json (name None, data_files" in lines[0]
    assert missing in lines[0]
    assert not out.exists() and not out.parent.exists()


def test_a_missing_spec_is_one_line(tmp_path, capsys):
    from mergesweep.cli import main

    out = tmp_path / "datasets.json"
    assert main(["prefetch-datasets", "--spec", str(tmp_path / "nowhere.json"), "--out", str(out)]) == 1
    assert f"mergesweep prefetch-datasets: error: --spec {tmp_path / 'nowhere.json'}: file not found" in \
        capsys.readouterr().err
    assert not out.exists()
