"""Profiles the Snakemake way (no cluster needed): ``mergesweep profile install slurm`` writes the
named profile into Snakemake's user profile directory so that ``snakemake --profile slurm`` works
as typed from the repository root; the per-rule resources live in the rules, so a per-rule override
on the command line changes that one resource and nothing else."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergesweep.profile import ProfileError, install

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "profiles" / "slurm" / "config.yaml"


def _env(xdg: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SNAKEMAKE_PROFILE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    if xdg is not None:
        env["XDG_CONFIG_HOME"] = str(xdg)
    return env


def _snakemake(*args: str, cwd: Path, xdg: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=_env(xdg),
                          capture_output=True, text=True, timeout=120)


# -- install ----------------------------------------------------------------------------------------
def test_install_then_snakemake_profile_slurm_plans_from_the_repo_root(tmp_path):
    xdg = tmp_path / "xdg"
    proc = subprocess.run(
        [sys.executable, "-m", "mergesweep", "profile", "install", "slurm", "--partition", "gpu",
         "--account", "me"], cwd=REPO, env=_env(xdg), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    installed = xdg / "snakemake" / "slurm" / "config.yaml"
    assert f"installed {installed}" in proc.stdout and "snakemake --profile slurm" in proc.stdout
    settings = yaml.safe_load(installed.read_text())
    template = yaml.safe_load(TEMPLATE.read_text())
    assert settings.pop("submitit-partition") == "gpu" and settings.pop("submitit-account") == "me"
    assert settings == template  # everything else straight from the one template

    # the command a cluster user types, from the repository root (outputs planned in a temp dir)
    workdir = tmp_path / "work"
    smk = _snakemake("--profile", "slurm", "-n", "--directory", str(workdir), cwd=REPO, xdg=xdg)
    assert smk.returncode == 0, smk.stderr[-3000:]
    assert "Using profiles slurm and workflow specific profile" in smk.stderr
    assert "This was a dry-run" in smk.stdout + smk.stderr

    # without the install step it fails as the issue describes
    bare = _snakemake("--profile", "slurm", "-n", "--directory", str(workdir), cwd=REPO,
                      xdg=tmp_path / "empty")
    assert bare.returncode != 0 and "no profile.yaml (or config.yaml) found" in bare.stderr


@pytest.mark.parametrize("partition", ["a b", "gpu;rm -rf x", "-p", "", "gpu\nexecutor: local",
                                       "$(id)", "x" * 65, "gpu,", "gpu:a100", "gpu#x"])
def test_bad_partition_names_are_refused(tmp_path, partition):
    with pytest.raises(ProfileError, match="not a valid SLURM partition name"):
        install("slurm", partition=partition, directory=tmp_path)
    assert not (tmp_path / "slurm").exists()


@pytest.mark.parametrize("account", ["me you", "a'b", "acct,other"])
def test_bad_account_names_are_refused(tmp_path, account):
    with pytest.raises(ProfileError, match="not a valid SLURM account name"):
        install("slurm", account=account, directory=tmp_path)


@pytest.mark.parametrize("partition", ["gpu", "gpu,gpu-long", "a100_80g.x", "P1"])
def test_good_partition_names_are_written(tmp_path, partition):
    path, status = install("slurm", partition=partition, directory=tmp_path)
    assert status == "installed"
    assert yaml.safe_load(path.read_text())["submitit-partition"] == partition


def test_no_overwrite_without_force(tmp_path):
    path, status = install("slurm", partition="gpu", directory=tmp_path)
    first = path.read_text()
    assert (status, install("slurm", partition="gpu", directory=tmp_path)[1]) == ("installed", "unchanged")
    with pytest.raises(ProfileError, match=re.escape(str(path)) + ".*--force"):
        install("slurm", partition="other", directory=tmp_path)
    assert path.read_text() == first
    path.write_text(first + "jobs: 3\n")  # edited by hand: also not replaced silently
    with pytest.raises(ProfileError, match="exists and differs"):
        install("slurm", partition="gpu", directory=tmp_path)
    assert install("slurm", partition="other", directory=tmp_path, force=True)[1] == "replaced"
    assert yaml.safe_load(path.read_text())["submitit-partition"] == "other"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporaries left


def test_cli_error_names_the_file(tmp_path):
    cmd = [sys.executable, "-m", "mergesweep", "profile", "install", "slurm", "--dir", str(tmp_path)]
    assert subprocess.run(cmd + ["--partition", "a"], cwd=REPO, env=_env(), capture_output=True).returncode == 0
    proc = subprocess.run(cmd + ["--partition", "b"], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"{tmp_path / 'slurm' / 'config.yaml'} exists and differs" in proc.stderr


def test_a_shadowing_profile_file_is_reported(tmp_path):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "config.v8+.yaml").write_text("jobs: 1\n")
    with pytest.raises(ProfileError, match=r"config\.v8\+\.yaml, which Snakemake may read instead"):
        install("slurm", directory=tmp_path)


def test_unknown_and_workflow_profiles_are_not_installed(tmp_path):
    with pytest.raises(ProfileError, match="no profile template 'nosuch'.*available: .*slurm"):
        install("nosuch", directory=tmp_path)
    with pytest.raises(ProfileError, match="loaded by Snakemake by itself"):
        install("default", directory=tmp_path)


# -- resources: in the rules, overridable one at a time ------------------------------------------
def test_the_slurm_profile_sets_no_per_rule_resources():
    settings = yaml.safe_load(TEMPLATE.read_text())
    assert "set-resources" not in settings and "set-threads" not in settings
    assert settings["executor"] == "submitit"


SMALL = r'''
rule all:
    input: "out/e.txt", "out/m.txt", "out/a.txt"
rule evaluate_merged:
    output: "out/e.txt"
    threads: 4
    resources: runtime=lambda wc, attempt: 60 * attempt, mem_mb=lambda wc, attempt: 16000 * attempt, gpu=1
    shell: "touch {output}"
rule merge:
    output: "out/m.txt"
    threads: 2
    resources: runtime=30, mem_mb=8000, gpu=0
    shell: "touch {output}"
rule aggregate:
    output: "out/a.txt"
    shell: "touch {output}"
'''


def _planned_resources(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """``{(rule, output): {resource: value}}`` from a dry run's job descriptions."""
    jobs: dict[tuple[str, str], dict[str, str]] = {}
    for block in re.split(r"^(?=(?:local)?rule \S+:$)", text, flags=re.MULTILINE):
        head = re.match(r"(?:local)?rule (\S+):$", block, flags=re.MULTILINE)
        res = re.search(r"^\s+resources: (.*)$", block, flags=re.MULTILINE)
        if not head or not res:
            continue
        output = re.search(r"^\s+output: (.*)$", block, flags=re.MULTILINE)
        key = (head.group(1), output.group(1) if output else "")
        jobs[key] = dict(item.split("=", 1) for item in res.group(1).split(", "))
    return jobs


def _dry_run(workdir: Path, *extra: str, snakefile: Path | None = None, cwd: Path = REPO):
    args = ["--profile", str(REPO / "profiles" / "slurm"), "-n", "--directory", str(workdir)]
    if snakefile is not None:
        args += ["--snakefile", str(snakefile)]
    proc = _snakemake(*args, *extra, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _planned_resources(proc.stdout + proc.stderr)
    assert jobs, proc.stdout[-2000:]
    return jobs


def _only_change(before, after, rule: str, resource: str, value: str) -> None:
    assert before.keys() == after.keys()
    changed = {}
    for key in before:
        diff = {k for k in before[key].keys() | after[key].keys() if before[key].get(k) != after[key].get(k)}
        if diff:
            changed[key] = diff
    targets = [key for key in before if key[0] == rule]
    assert targets, f"no job of rule {rule!r} planned"
    assert changed == {key: {resource} for key in targets}, changed
    assert all(after[key][resource] == value for key in targets)


def test_set_resources_changes_one_resource_of_one_rule(tmp_path):
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(SMALL)
    snakefile = workdir / "Snakefile"
    before = _dry_run(workdir, snakefile=snakefile, cwd=workdir)
    assert before[("evaluate_merged", "out/e.txt")]["gpu"] == "1"
    assert before[("evaluate_merged", "out/e.txt")]["mem_mb"] == "16000"
    assert before[("aggregate", "out/a.txt")]["runtime"] == "30"  # the profile's default-resources
    after = _dry_run(workdir, "--set-resources", "evaluate_merged:runtime=240", snakefile=snakefile, cwd=workdir)
    _only_change(before, after, "evaluate_merged", "runtime", "240")


def test_set_resources_on_the_real_workflow_changes_one_resource(tmp_path):
    """The same on this repository's workflow (default config): the rules' own resources stay."""
    before = _dry_run(tmp_path)
    rule = "evaluate_merged" if any(r == "evaluate_merged" for r, _ in before) else next(
        r for (r, _), res in before.items() if "runtime" in res and r != "all")
    after = _dry_run(tmp_path, "--set-resources", f"{rule}:runtime=240")
    _only_change(before, after, rule, "runtime", "240")
