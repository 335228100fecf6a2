"""``mergesweep merge --config FILE.yaml --out DIR``: one merge from its YAML, by hand or as the
workflow's ``merge`` rule.

``--model-id`` is the id the merge must get (the workflow passes its plan's): the engine computes
the id from the inputs' records and fails if the two differ.

Outputs are never lost: ``--out`` may be absent, an empty directory, or this very merge's model
with every file its record lists (then nothing is done: "up to date"; with a listed file missing
it is an error unless ``--force``). Another model or a directory with other files in it is
replaced only with ``--force``; an ``--out`` that is, contains or lies inside an input (the base,
an expert, a permutation map, the config file) or that is not a directory is refused even then.
The model is written to a temporary sibling and renamed into place when complete; SIGTERM,
SIGINT and SIGHUP remove the temporary and exit with ``128 + signal`` (143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

#: the record a merged model carries (written by the engine)
RECORD = "mergesweep.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="merge YAML (method, base, experts, params, ...)")
    parser.add_argument("--out", required=True,
                        help="output checkpoint directory (written atomically; must be absent, empty or this "
                             "merge's model unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if it holds another model or other files (never an input)")
    parser.add_argument("--device", default=None,
                        help="override the YAML's device: auto (CUDA when this process was given a GPU, else CPU), "
                             "cpu, cuda, cuda:N (the device never changes the model's id)")
    parser.add_argument("--dtype", default=None, help="override the YAML's output dtype")
    parser.add_argument("--model-id", default=None,
                        help="the id this merge must get (the workflow passes its plan's): the merge fails if the id "
                             "computed from the inputs' records differs (default: computed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default on CPU: 1, fastest for the streaming engine; "
                             "on CUDA: torch's default)")


# --------------------------------------------------------------------------------------------
# where the output may go
# --------------------------------------------------------------------------------------------
def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(p))


def _is_within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies below it (symbolic links resolved; bind mounts and other
    aliases of an existing ``outer`` detected by device and inode)."""
    ri, ro = _real(inner), _real(outer)
    if ri == ro or ro in ri.parents:
        return True
    try:
        so = os.stat(ro)
    except OSError:
        return False
    for p in (ri, *ri.parents):
        try:
            if os.path.samestat(os.stat(p), so):
                return True
        except OSError:
            continue
    return False


def input_paths(cfg: Mapping[str, Any], config_path: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """``(label, path)`` of everything a merge reads: base, experts, permutation maps, config."""
    out: list[tuple[str, Path]] = []
    if cfg.get("base") is not None:
        out.append(("base", Path(cfg["base"])))
    out += [(f"experts[{i}]", Path(e)) for i, e in enumerate(cfg["experts"])]
    for key, path in (cfg.get("align") or {}).items():
        out.append((f"align.{key}", Path(path)))
    if config_path is not None:
        out.append(("--config", Path(config_path)))
    return out


def check_not_an_input(out: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an ``out`` that is, contains or lies inside one of ``inputs``."""
    from mergesweep.atomic import OutputError

    for label, path in inputs:
        if not os.path.lexists(path):
            continue
        if _is_within(out, path):
            same = _is_within(path, out)
            rel = "is" if same else "is inside"
            raise OutputError(f"--out {out} {rel} the input {label} ({path}); refusing to write "
                              f"{'over' if same else 'into'} an input (even with --force)")
        if _is_within(path, out):
            raise OutputError(f"--out {out} contains the input {label} ({path}); replacing it would delete "
                              f"that input (even with --force)")


def _read_record(out: Path) -> dict | None:
    try:
        rec = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _listing(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def existing_output(out: Path, planned_id: str | None, force: bool) -> str | None:
    """What to do with an existing ``out``: ``None`` (merge), ``"up-to-date"`` (it is this merge's
    model, complete), or raise :class:`~mergesweep.atomic.OutputError`. With ``force`` any
    directory may be replaced (and "up-to-date" becomes a re-merge)."""
    from mergesweep.atomic import OutputError

    if not os.path.lexists(out):
        return None
    if not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a directory; refusing to replace it "
                          "(even with --force; remove it yourself)")
    try:
        entries = sorted(os.listdir(out))
    except OSError as e:
        raise OutputError(f"--out {out}: cannot list the existing directory ({e.strerror})") from e
    if not entries:
        return None
    rec = _read_record(out)
    other = rec.get("model_id") if rec else None
    if other and planned_id and other == planned_id:
        missing = [f for f in rec.get("files") or [] if isinstance(f, str) and not (out / f).is_file()]
        if force:
            return None
        if not missing:
            return "up-to-date"
        raise OutputError(f"--out {out}: holds model {other} but {_listing(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} missing; use --force to merge it again")
    if force:
        return None
    if other:
        raise OutputError(f"--out {out}: holds another model ({other}; this merge is "
                          f"{planned_id or 'not known before merging'}); refusing to replace it without --force")
    raise OutputError(f"--out {out}: directory is not empty and holds no mergesweep model "
                      f"({_listing(entries)}); refusing to replace it without --force")


def _planned_id(cfg: dict, dtype: str | None) -> str:
    from mergesweep.merge.config import planned_model_id

    return planned_model_id({**cfg, "dtype": dtype} if dtype is not None else cfg)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from mergesweep.atomic import SignalExit, signal_cleanup

    out = Path(args.out)
    try:
        with signal_cleanup():
            return _run(args, out)
    except SignalExit as e:
        print(f"mergesweep merge: interrupted by {e.signame}; no partial output left at {out}", file=sys.stderr)
        raise


def _run(args: argparse.Namespace, out: Path) -> int:
    from mergesweep.atomic import check_writable
    from mergesweep.merge.config import load_merge_yaml

    if args.threads is not None and args.threads < 1:
        from mergesweep.errors import ConfigError

        raise ConfigError(f"--threads: expected a positive integer, got {args.threads}")
    cfg = load_merge_yaml(args.config)
    check_not_an_input(out, input_paths(cfg, args.config))
    dtype = args.dtype or cfg["dtype"]
    device = args.device or cfg["device"]
    if out.is_symlink():  # the model goes where the link points; the link stays
        out = _real(out)
    planned = args.model_id
    if planned is None and os.path.isfile(out / RECORD):  # only needed to recognise an existing model
        planned = _planned_id(cfg, dtype)
    action = existing_output(out, planned, args.force)
    if action == "up-to-date":
        rec = _read_record(out) or {}
        print(f"mergesweep merge: {out} is up to date (model {planned}); nothing to do "
              "(--force merges again)", file=sys.stderr)
        print(json.dumps({"model_id": planned, "method": rec.get("method"), "params": rec.get("params"),
                          "up_to_date": True}))
        return 0
    if out.is_dir() and os.listdir(out):
        print(f"mergesweep merge: replacing {out} (--force)", file=sys.stderr)
    check_writable(out)

    from mergesweep.devices import resolve_device
    from mergesweep.merge.tuning import tune_for_merge

    # resolved once, here: the threads are tuned for, and the engine merges on, the same device
    device = resolve_device(device, "--device" if args.device else "device")
    tune_for_merge(device, args.threads)  # process-wide: torch threads, glibc malloc
    from mergesweep.merge.engine import merge_checkpoints

    meta = merge_checkpoints(
        cfg["method"],
        cfg["base"],
        cfg["experts"],
        cfg["params"],
        out,
        dtype=dtype,
        device=device,
        shard_size=cfg["shard_size"],
        align=cfg["align"],
        vocab_policy=cfg["vocab_policy"],
        tie_policy=cfg["tie_policy"],
        expert_names=cfg["expert_names"],
        stats=cfg["stats"],
        calibration=cfg["calibration"],
        calibration_settings=cfg["calibration_settings"],
        expect_model_id=args.model_id,
    )
    print(json.dumps({k: meta.get(k) for k in ("model_id", "method", "params", "runtime_s", "peak_rss_mb")}))
    return 0
