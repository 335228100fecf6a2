"""Loading and validating a workflow config: one schema, one set of defaults, errors naming keys.

The schema (``mergesweep/schemas/config.schema.yaml``) is the one place every key, its type or
pattern and its default live. :func:`validate_config` checks a config against it (unknown keys
are rejected at every level), fills the defaults in, and reports the first problem as
``<key path>: <what is wrong>`` (``merge.dtype: 'float8' is not one of ...``). The Snakefile
calls it before building the plan; :mod:`mergesweep.plan` then checks what a schema cannot
(cross-references, merge parameters against each method's spec, paths that must exist) with the
same parsers the CLI uses.
"""

from __future__ import annotations

import copy
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from mergesweep.errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("schemas") / "config.schema.yaml"


@lru_cache(maxsize=1)
def schema() -> dict:
    import yaml

    return yaml.safe_load(SCHEMA_PATH.read_text())


@lru_cache(maxsize=1)
def _validator_class():
    import jsonschema

    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, sch):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, sch)

    return jsonschema.validators.extend(base, {"properties": properties_with_defaults})


def key_path(path) -> str:
    """``deque(['merges', 0, 'align'])`` -> ``merges[0].align``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _message(err) -> str:
    """A short message for a jsonschema error, naming the offending key."""
    where = key_path(err.absolute_path)
    v = err.validator
    if v == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        key = f"{where}.{extra[0]}" if err.absolute_path else extra[0]
        return f"{key}: unknown key (allowed here: {allowed})"
    if v == "required":
        return f"{where}: {err.message}"
    if v == "pattern":
        why = err.schema.get("description") or f"must match {err.validator_value}"
        return f"{where}: {err.instance!r} is not allowed ({why})"
    if v == "propertyNames":
        return f"{where}: key {err.instance!r} is not a safe name (letters, digits, '_.-'; no leading dot)"
    if v in ("oneOf", "anyOf"):
        if where == "base":
            return "base: give exactly one of 'source' (fetch a checkpoint) or 'pretrain' (build a tiny base)"
        if err.schema.get("description"):
            return f"{where}: {err.instance!r} is not valid (expected {err.schema['description']})"
        if err.context:
            best = min(err.context, key=lambda e: len(e.absolute_path))
            return f"{where}: {err.instance!r} is not valid ({best.message})"
    return f"{where}: {err.message}"


def validate_config(config: Any) -> dict:
    """Validate ``config`` against the schema and return a copy with every default filled in.

    Raises :class:`ConfigError` whose message starts with the key path."""
    if not isinstance(config, dict):
        raise ConfigError("(top level): a config is a mapping of keys (name, base, suites, experts, ...)")
    doc = copy.deepcopy(dict(config))
    validator = _validator_class()(schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: (len(e.absolute_path), key_path(e.absolute_path)))
    if errors:
        # the deepest error names the most precise key; report one, fix, re-run
        err = max(errors, key=lambda e: len(e.absolute_path))
        raise ConfigError(_message(err))
    return doc


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML config; a syntax error names the file and line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    return doc if doc is not None else {}
