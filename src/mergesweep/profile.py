"""``mergesweep profile install NAME``: install a repository profile as a named Snakemake profile.

``snakemake --profile slurm`` looks for a profile named ``slurm`` in the current directory, then
in Snakemake's user profile directory (``platformdirs.user_config_dir("snakemake")``: on Linux
``$XDG_CONFIG_HOME/snakemake``, by default ``~/.config/snakemake``), then in the site directory
(``/etc/xdg/snakemake``). This command writes ``<that directory>/<NAME>/config.yaml`` from the one
template in the repository, ``profiles/<NAME>/config.yaml`` (which also works in place:
``snakemake --profile profiles/slurm``), with the cluster's defaults filled in::

    mergesweep profile install slurm --partition gpu --account myproj
    snakemake --profile slurm

It refuses to replace an installed profile that differs from the new one unless ``--force`` is
given, and writes atomically. Per-rule resources are not part of a profile: the rules derive them
from the config (see docs/slurm.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import yaml

from mergesweep.atomic import atomic_file
from mergesweep.errors import MergesweepError

#: SLURM names written into a profile: letters, digits, ``_ . -`` (partitions: a comma list)
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
PARTITION_RE = re.compile(rf"{_NAME}(,{_NAME})*")
ACCOUNT_RE = re.compile(_NAME)
PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: the workflow profile: Snakemake loads it by itself, it is not installed
NOT_INSTALLABLE = {"default"}
#: profile files Snakemake reads in a profile directory (config.v8+.yaml, profile.yaml, ...)
_PROFILE_FILE_RE = re.compile(r"(profile|config)(\.v\d+\+)?\.yaml")


class ProfileError(MergesweepError):
    """A profile cannot be installed (bad name or value, no template, an existing profile)."""


def snakemake_profile_dir() -> Path:
    """Snakemake's user profile directory, where ``--profile NAME`` finds ``NAME/config.yaml``."""
    from platformdirs import user_config_dir  # what snakemake.common.get_appdirs() uses

    return Path(user_config_dir("snakemake", "snakemake"))


def repo_profiles_dirs() -> list[Path]:
    """Where templates are looked for: ``profiles/`` of the current directory (the repository
    root, where workflows are run), then of the source checkout this module belongs to."""
    dirs = [Path.cwd() / "profiles", Path(__file__).resolve().parents[2] / "profiles"]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def find_template(name: str, template: str | os.PathLike | None = None) -> Path:
    """The template ``config.yaml`` for profile ``name`` (or the file/directory ``template``)."""
    if template is not None:
        path = Path(template)
        path = path / "config.yaml" if path.is_dir() else path
        if not path.is_file():
            raise ProfileError(f"--template {template}: no such profile file")
        return path
    searched = []
    for d in repo_profiles_dirs():
        path = d / name / "config.yaml"
        if path.is_file():
            return path
        searched.append(str(path))
    available = sorted(
        {p.parent.name for d in repo_profiles_dirs() for p in d.glob("*/config.yaml")} - NOT_INSTALLABLE
    )
    raise ProfileError(
        f"no profile template {name!r} (looked for {', '.join(searched) or 'profiles/ in this directory'}); "
        f"available: {', '.join(available) or 'none'} (run this from the repository root, or give --template)"
    )


def _check(value: str | None, pattern: re.Pattern, what: str) -> str | None:
    if value is None:
        return None
    if not pattern.fullmatch(value):
        raise ProfileError(
            f"--{what} {value!r}: not a valid SLURM {what} name (letters, digits, '_', '.', '-'"
            f"{', partitions separated by commas' if what == 'partition' else ''}; at most 64 characters each)"
        )
    return value


def _set_key(text: str, key: str, value: str, note: str) -> str:
    """Set ``key: value`` in profile YAML text: replace the (possibly commented-out) line of
    ``key`` or append one. Comments and layout of the template stay as they are."""
    line = f"{key}: {value}"
    line = f"{line:<42} # {note}"
    pattern = re.compile(rf"^#?[ \t]*{re.escape(key)}[ \t]*:.*$", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(lambda _: line, text, count=1)
    return text.rstrip("\n") + "\n" + line + "\n"


def render(template: Path, *, partition: str | None = None, account: str | None = None) -> str:
    """The installed profile's text: the template with a header and the cluster's defaults."""
    partition = _check(partition, PARTITION_RE, "partition")
    account = _check(account, ACCOUNT_RE, "account")
    text = template.read_text()
    try:
        settings = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{template}: not valid YAML: {e}") from e
    if not isinstance(settings, dict):
        raise ProfileError(f"{template}: a profile is a mapping of Snakemake options")
    if (partition or account) and settings.get("executor") != "submitit":
        raise ProfileError(
            f"--partition/--account are settings of the submitit executor; {template} does not use it"
        )
    if partition:
        text = _set_key(text, "submitit-partition", partition, "set by mergesweep profile install")
    if account:
        text = _set_key(text, "submitit-account", account, "set by mergesweep profile install")
    check = yaml.safe_load(text)  # the edit must leave valid YAML with the intended values
    for key, value in (("submitit-partition", partition), ("submitit-account", account)):
        if value and check.get(key) != value:
            raise ProfileError(f"{template}: could not set {key} (got {check.get(key)!r})")
    header = (
        f"# Installed by `mergesweep profile install` from {template.resolve()}\n"
        f"# (re-run it with --force after that template changes). Used by: snakemake --profile "
        f"{template.parent.name}\n"
    )
    return header + text


def install(
    name: str,
    *,
    partition: str | None = None,
    account: str | None = None,
    directory: str | os.PathLike | None = None,
    force: bool = False,
    template: str | os.PathLike | None = None,
) -> tuple[Path, str]:
    """Write profile ``name`` to ``<directory>/<name>/config.yaml`` (default directory:
    :func:`snakemake_profile_dir`). Returns the path and what happened: ``installed``,
    ``replaced`` or ``unchanged``."""
    if not PROFILE_NAME_RE.fullmatch(name) or name in NOT_INSTALLABLE:
        raise ProfileError(
            f"profile name {name!r}: "
            + ("the workflow profile profiles/default is loaded by Snakemake by itself; nothing to install"
               if name in NOT_INSTALLABLE else "use letters, digits, '_', '.', '-'")
        )
    source = find_template(name, template)
    text = render(source, partition=partition, account=account)
    target_dir = Path(directory) if directory is not None else snakemake_profile_dir()
    target = target_dir / name / "config.yaml"
    if target.parent.is_dir():
        # a profile.yaml or config.vN+.yaml there would be read instead of our config.yaml
        shadows = sorted(p.name for p in target.parent.iterdir()
                         if _PROFILE_FILE_RE.fullmatch(p.name) and p.name != "config.yaml")
        if shadows:
            raise ProfileError(
                f"{target.parent} also holds {', '.join(shadows)}, which Snakemake may read instead of "
                f"config.yaml; remove {'them' if len(shadows) > 1 else 'it'} first"
            )
    status = "installed"
    if target.exists() or target.is_symlink():
        try:
            old = target.read_text()
        except OSError as e:
            raise ProfileError(f"{target}: exists and cannot be read ({e})") from e
        if old == text:
            return target, "unchanged"
        if not force:
            raise ProfileError(
                f"{target} exists and differs from the profile to install (from {source}); "
                "not replacing it: compare the two, or pass --force to replace it"
            )
        status = "replaced"
    if target.is_symlink():
        target.unlink()  # replace the link itself, never write through it
    with atomic_file(target) as f:
        f.write(text)
    return target, status


# -- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser(
        "install",
        help="write a repository profile into Snakemake's profile directory (snakemake --profile NAME)",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("name", help="profile to install: a directory of the repository's profiles/, e.g. slurm")
    p.add_argument("--partition", help="default SLURM partition of every job (submitit-partition)")
    p.add_argument("--account", help="default SLURM account of every job (submitit-account)")
    p.add_argument("--dir", dest="directory", metavar="DIR",
                   help="profile directory to write NAME/config.yaml into (default: Snakemake's user "
                        f"profile directory, here {snakemake_profile_dir()})")
    p.add_argument("--force", action="store_true", help="replace an installed profile that differs")
    p.add_argument("--template", metavar="PATH",
                   help="template profile file or directory (default: profiles/NAME/config.yaml)")


def run(args: argparse.Namespace) -> int:
    path, status = install(
        args.name,
        partition=args.partition,
        account=args.account,
        directory=args.directory,
        force=args.force,
        template=args.template,
    )
    print(f"{status} {path}")
    if args.directory is not None and Path(args.directory).resolve() != snakemake_profile_dir().resolve():
        print(f"use it with: snakemake --profile {path.parent}")
    else:
        print(f"use it with: snakemake --profile {args.name}")
        if (Path.cwd() / args.name).exists():
            print(f"note: ./{args.name} exists here; Snakemake looks in the current directory first",
                  file=sys.stderr)
    return 0
