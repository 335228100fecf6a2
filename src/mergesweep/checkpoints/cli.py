"""``mergesweep fetch``: fetch one checkpoint source into an HF-layout directory, verified."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from mergesweep.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="checkpoint name (its model id)")
    p.add_argument("--source", required=True,
                   help="source mapping as JSON/YAML, e.g. '{type: local, path: /ckpt}', or @FILE.yaml")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--role", default="base", choices=["base", "expert"])
    p.add_argument("--domain", help="for experts: the suite it is an expert of")
    p.add_argument("--uid", help="the uid of the checkpoint's definition in the plan (recorded for merge ids)")
    p.add_argument("--cache-dir", default="resources/downloads", type=Path)
    p.add_argument("--no-value-check", action="store_true", help="skip the NaN/inf scan of every tensor")
    p.add_argument("--base-dir", type=Path,
                   help="for a LoRA adapter: the fetched base checkpoint it must fit (every adapted module's shape)")
    p.add_argument("--base-name", action="append", default=[],
                   help="for a LoRA adapter: a name its adapter_config.json may give as base_model_name_or_path "
                        "(the base's name, base.hf_id, a hub base's repo_id); repeatable")


def parse_source(text: str) -> dict:
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        src = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--source: not valid YAML/JSON ({e})") from e
    if not isinstance(src, dict):
        raise ConfigError("--source: must be a mapping with a 'type' key")
    return src


def run(args: argparse.Namespace) -> int:
    from mergesweep.checkpoints.sources import fetch

    rec = fetch(args.name, parse_source(args.source), args.out, role=args.role, domain=args.domain or None,
                uid=args.uid, cache_dir=args.cache_dir, check_values=not args.no_value_check,
                base_dir=args.base_dir, base_names=tuple(args.base_name))
    print(json.dumps({"model_id": rec.model_id, "fingerprint": rec.fingerprint, **(rec.extra.get("summary") or {})}))
    return 0
