#!/usr/bin/env python
"""Time to submit N small jobs to SLURM: job arrays (the submitit executor) vs one sbatch per job.

    .venv/bin/python benchmarks/bench_submit.py            # N=1000, needs the test cluster (root)
    .venv/bin/python benchmarks/bench_submit.py --n 200 --json bench.json

Jobs go to the cluster's ``hold`` partition (State=DOWN: jobs queue but never start), so only
submission is measured; everything is cancelled afterwards. Four measurements:

1. ``snakemake --profile profiles/slurm`` on a workflow of N independent jobs (arrays: N jobs in
   ceil(N / array-max-size) sbatch calls);
2. the same with ``--submitit-array-max-size 1`` (the same executor, one sbatch per job);
3. raw ``sbatch --array=0-(N-1)`` once;
4. raw ``sbatch`` N times (what a one-sbatch-per-job executor costs at least).

For 1 and 2, "submit" is the time the executor spent submitting (its own log line) and "until
all queued" the wall time from starting Snakemake until SLURM holds all N jobs. The anchor: users
of the official SLURM executor plugin report about one second per job submission.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
PARTITION = "hold"

SNAKEFILE = """
N = {n}
rule all:
    input: expand("out/{{i}}.txt", i=range(N))
rule job:
    output: "out/{{i}}.txt"
    resources: runtime=5, mem_mb=100
    shell: "touch {{output}}"
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}:/usr/sbin"
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), e.get("PYTHONPATH")]))
    return e


def queued(name: str) -> int:
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True,
                         text=True, env=env()).stdout
    return len(out.split())


def cancel(name: str) -> None:
    subprocess.run(["scancel", "-n", name], env=env())
    deadline = time.time() + 120
    while queued(name) and time.time() < deadline:
        time.sleep(1)


def bench_snakemake(n: int, array_max_size: int, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "Snakefile").write_text(SNAKEFILE.format(n=n))
    log_path = workdir / "snakemake.log"
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(PROFILE), "--directory", str(workdir),
           "--jobs", str(n), "--submitit-partition", PARTITION,
           "--submitit-array-max-size", str(array_max_size),
           "--seconds-between-status-checks", "30", "--quiet", "rules"]
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=workdir)
        all_queued = None
        while time.time() - start < 3600:
            if queued("smk-job") >= n:
                all_queued = time.time() - start
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        # let the executor log its last submission before stopping Snakemake
        pattern = re.compile(r"submitit: (\d+) job\(s\)")
        deadline = time.time() + 30
        while time.time() < deadline and sum(map(int, pattern.findall(log_path.read_text()))) < n:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the executor cancels what it submitted
        try:
            proc.wait(300)
        except subprocess.TimeoutExpired:
            proc.kill()
    cancel("smk-job")
    text = log_path.read_text()
    lines = re.findall(r"submitit: (\d+) job\(s\) in (\d+) submission\(s\) \(([\d.]+)s\)", text)
    if all_queued is None or not lines:
        raise RuntimeError(f"snakemake did not queue {n} jobs; see {log_path}:\n{text[-3000:]}")
    return {
        "jobs": sum(int(j) for j, _, _ in lines),
        "sbatch_calls": sum(int(s) for _, s, _ in lines),
        "submit_s": sum(float(t) for _, _, t in lines),
        "until_all_queued_s": all_queued,
    }


def bench_raw(n: int, workdir: Path) -> dict:
    out = str(workdir / "raw-%A_%a.out")
    base = ["sbatch", "-p", PARTITION, "-J", "bench-raw", "-t", "5", "--mem=100M", "-o", out]
    start = time.time()
    subprocess.run([*base, f"--array=0-{n - 1}", "--wrap", "true"], check=True,
                   capture_output=True, env=env())
    array_s = time.time() - start
    cancel("bench-raw")
    start = time.time()
    for _ in range(n):
        subprocess.run([*base, "--wrap", "true"], check=True, capture_output=True, env=env())
    single_s = time.time() - start
    cancel("bench-raw")
    return {"array_sbatch_s": array_s, "single_sbatch_s": single_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="number of jobs (default 1000)")
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--skip-raw", action="store_true", help="skip the raw sbatch measurements")
    args = ap.parse_args()
    if shutil.which("sbatch", path=env()["PATH"]) is None:
        print("no sbatch on the PATH: bring the test cluster up first (.ci/slurm/up.sh, as root)")
        return 2
    if os.geteuid() == 0 and (REPO / ".ci" / "slurm" / "up.sh").exists():
        subprocess.run(["bash", str(REPO / ".ci" / "slurm" / "up.sh")], check=True, env=env())
    n = args.n
    results: dict = {"n": n, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp:
        tmp = Path(tmp)
        print(f"submitting {n} jobs through the profile, arrays ...", flush=True)
        results["profile_arrays"] = bench_snakemake(n, 1000, tmp / "arrays")
        print(f"submitting {n} jobs through the profile, one sbatch per job ...", flush=True)
        results["profile_single"] = bench_snakemake(n, 1, tmp / "single")
        if not args.skip_raw:
            print(f"raw sbatch: one array of {n}, then {n} single jobs ...", flush=True)
            results["raw"] = bench_raw(n, tmp)
    a, s = results["profile_arrays"], results["profile_single"]
    results["ratio_submit"] = s["submit_s"] / a["submit_s"]
    results["ratio_until_all_queued"] = s["until_all_queued_s"] / a["until_all_queued_s"]
    print()
    print(f"{'':44s} {'sbatch calls':>12s} {'submit s':>9s} {'until queued s':>15s} {'ms/job':>7s}")
    for label, r in (("profile, arrays (submitit executor)", a), ("profile, one sbatch per job", s)):
        print(f"{label:44s} {r['sbatch_calls']:12d} {r['submit_s']:9.2f} {r['until_all_queued_s']:15.2f}"
              f" {1000 * r['submit_s'] / n:7.2f}")
    if "raw" in results:
        raw = results["raw"]
        print(f"{'raw sbatch --array (1 call)':44s} {1:12d} {raw['array_sbatch_s']:9.2f} {'':>15s}"
              f" {1000 * raw['array_sbatch_s'] / n:7.2f}")
        print(f"{'raw sbatch x N':44s} {n:12d} {raw['single_sbatch_s']:9.2f} {'':>15s}"
              f" {1000 * raw['single_sbatch_s'] / n:7.2f}")
    print(f"\nratio one-sbatch-per-job / arrays: submit {results['ratio_submit']:.1f}x, "
          f"until all queued {results['ratio_until_all_queued']:.1f}x")
    print(f"anchor: ~1 s per sbatch with the official SLURM plugin = ~{n} s for {n} jobs")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
