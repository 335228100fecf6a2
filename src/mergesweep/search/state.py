"""One JSON file per generation: what a search proposed, what it saw, and its state.

``<dir>/generation-0000.json``, ``generation-0001.json``, ... each written atomically
(:func:`mergesweep.atomic.write_json`: a killed writer never leaves a half file under the final
name), with::

    format       1
    strategy     "map" | "cmaes" | "cycleqd"
    generation   its index (0 for the first proposals)
    seed         the search's seed
    config       the strategy's config (space, objective, budget, options); a resumed search
                 whose config differs is refused
    observations the observations the strategy received to plan this generation (validation
                 scores of the previous generation's proposals; none for generation 0)
    proposals    [{params, x, info}]: this generation's candidates (empty: the search is done)
    state        the strategy's state after proposing (JSON; the CMA-ES object as base64 of its
                 pickle, RNG records, archives, fits)

:func:`resume` returns the last generation of a directory (``None`` for an empty or missing
one); generations must be numbered from 0 without a gap, and a file that cannot be read or
parsed, or lacks a field, raises :class:`~mergesweep.search.base.SearchError` naming it.

The pickled CMA-ES object is loaded from these files on resume: they are this workflow's own
outputs under ``results/``; do not resume from a directory you did not write.
"""

from __future__ import annotations

import base64
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mergesweep.atomic import write_json
from mergesweep.search.base import Proposal, SearchError
from mergesweep.search.observations import Observation

FORMAT = 1
_NAME = re.compile(r"^generation-(\d{4,})\.json$")
_FIELDS = ("format", "strategy", "generation", "seed", "config", "observations", "proposals", "state")


@dataclass
class Generation:
    strategy: str
    generation: int
    seed: int
    config: dict
    observations: list[Observation] = field(default_factory=list)
    proposals: list[Proposal] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def done(self) -> bool:
        return not self.proposals

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "strategy": self.strategy,
            "generation": self.generation,
            "seed": self.seed,
            "config": self.config,
            "observations": [o.to_dict() for o in self.observations],
            "proposals": [p.to_dict() for p in self.proposals],
            "state": self.state,
        }


def generation_path(directory: str | Path, generation: int) -> Path:
    return Path(directory) / f"generation-{generation:04d}.json"


def save_generation(directory: str | Path, gen: Generation) -> Path:
    """Write ``gen`` atomically as ``<directory>/generation-NNNN.json``; returns the path."""
    path = generation_path(directory, gen.generation)
    data = gen.to_dict()
    # fail here, not halfway through a json.dump: everything must be plain JSON (write_json's
    # default=str would silently turn a numpy scalar into a string)
    try:
        json.dumps(data, allow_nan=True)
    except TypeError as e:
        raise SearchError(f"{path}: the generation is not JSON-serialisable ({e})") from None
    write_json(path, data)
    gen.path = path
    return path


def load_generation(path: str | Path) -> Generation:
    """Read one generation file; SearchError naming it when missing, unreadable or incomplete."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SearchError(f"{path}: generation file missing") from None
    except OSError as e:
        raise SearchError(f"{path}: cannot read the generation file ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise SearchError(f"{path}: corrupt generation file (not JSON: {e})") from None
    if not isinstance(data, dict):
        raise SearchError(f"{path}: corrupt generation file (not a JSON object)")
    missing = [k for k in _FIELDS if k not in data]
    if missing:
        raise SearchError(f"{path}: incomplete generation file (no {', '.join(missing)})")
    if data["format"] != FORMAT:
        raise SearchError(f"{path}: generation file format {data['format']!r}, this version reads {FORMAT}")
    m = _NAME.match(path.name)
    if m and int(m.group(1)) != data["generation"]:
        raise SearchError(f"{path}: the file says generation {data['generation']}, its name {int(m.group(1))}")
    try:
        return Generation(
            strategy=data["strategy"],
            generation=int(data["generation"]),
            seed=int(data["seed"]),
            config=data["config"],
            observations=[Observation.from_dict(o) for o in data["observations"]],
            proposals=[Proposal.from_dict(p) for p in data["proposals"]],
            state=data["state"],
            path=path,
        )
    except (KeyError, TypeError, ValueError, SearchError) as e:
        raise SearchError(f"{path}: corrupt generation file ({type(e).__name__}: {e})") from None


def generation_files(directory: str | Path) -> list[Path]:
    """The generation files of ``directory`` in order; SearchError naming the first missing one
    when the numbering has a gap."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = {}
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found[int(m.group(1))] = p
    files = []
    for i in range(len(found)):
        if i not in found:
            raise SearchError(f"{generation_path(directory, i)}: generation file missing "
                              f"(found generations {', '.join(map(str, sorted(found)))})")
        files.append(found[i])
    return files


def resume(directory: str | Path) -> Generation | None:
    """The last generation written to ``directory`` (None when there is none)."""
    files = generation_files(directory)
    if not files:
        return None
    return load_generation(files[-1])


def load_all(directory: str | Path) -> list[Generation]:
    """Every generation of ``directory``, in order (for reports: the convergence per generation)."""
    return [load_generation(p) for p in generation_files(directory)]


# --------------------------------------------------------------------------------------------
# opaque objects inside a JSON state
# --------------------------------------------------------------------------------------------
def pack(obj: Any) -> str:
    """``obj`` as base64 of its pickle (for a JSON state)."""
    return base64.b64encode(pickle.dumps(obj, protocol=4)).decode("ascii")


def unpack(text: str, what: str = "object") -> Any:
    try:
        return pickle.loads(base64.b64decode(text.encode("ascii"), validate=True))
    except Exception as e:  # noqa: BLE001 - any failure means the stored state is unusable
        raise SearchError(f"cannot restore the {what} from the search state ({type(e).__name__}: {e})") from None


def check_config(gen: Generation, strategy_name: str, config: Mapping[str, Any]) -> None:
    """Refuse to continue ``gen`` with another strategy or config (names the file)."""
    where = gen.path or f"generation {gen.generation}"
    if gen.strategy != strategy_name:
        raise SearchError(f"{where}: written by strategy {gen.strategy!r}, not {strategy_name!r}")
    if json.loads(json.dumps(config)) != gen.config:
        changed = sorted(k for k in set(config) | set(gen.config) if json.loads(json.dumps(config.get(k))) != gen.config.get(k))
        raise SearchError(
            f"{where}: the search's config changed since this generation was written ({', '.join(changed)}); "
            f"remove the directory to start the search again"
        )
