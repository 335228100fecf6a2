"""Embedded skills: small, deterministic tasks whose data the project generates from a seed.

Each skill turns a seed into disjoint train / validation / test splits of ``{"prompt", "target"}``
records. The prompt ends with ``"Output:"`` and the target starts with a space, so a model's
answer is scored as the continuation of the prompt (lm-eval ``loglikelihood``; ``acc`` is 1 when
the target is the greedy continuation, i.e. exact match of greedy decoding).

Skills (suites whose *domain* is the skill):

- ``arithmetic``: add two two-digit numbers (``47+38`` -> ``85``).
- ``reverse``: reverse the order of three words (``apple river stone`` -> ``stone river apple``).
- ``dateformat``: rewrite an ISO date as DD/MM/YYYY (``2023-05-17`` -> ``17/05/2023``).

Held-out suite (general knowledge the base already has, to measure forgetting):

- ``capitals``: four-way multiple choice over a table of countries and capitals shipped with the
  package (``zoo/data/capitals.tsv``).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from mergesweep.errors import ConfigError

WORDS = (
    "apple river stone cloud table green music paper light horse garden window silver "
    "orange forest bread yellow candle mountain pencil rabbit winter summer castle bottle "
    "dragon island jacket ladder mirror needle ocean pepper rocket saddle tiger violin "
    "wallet anchor basket cotton desert engine feather guitar hammer kettle lemon"
).split()


@dataclass(frozen=True)
class Skill:
    """A generated skill: an instruction and a function drawing one (input, output) pair."""

    name: str
    instruction: str
    draw: Callable[[random.Random], tuple[str, str]]
    description: str

    def record(self, x: str, y: str) -> dict:
        return {"prompt": f"{self.instruction}\nInput: {x}\nOutput:", "target": f" {y}", "input": x, "output": y}


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return " ".join(words), " ".join(reversed(words))


def _dateformat(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"{y:04d}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y:04d}"


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("arithmetic", "Add the two numbers.", _arithmetic, "two-digit addition"),
        Skill("reverse", "Reverse the order of the words.", _reverse, "reverse three words"),
        Skill("dateformat", "Rewrite the date as DD/MM/YYYY.", _dateformat, "ISO date to DD/MM/YYYY"),
    )
}
HELDOUT = ("capitals",)


def get_skill(name: str, key: str = "skill") -> Skill:
    try:
        return SKILLS[name]
    except KeyError:
        raise ConfigError(f"{key}: unknown skill '{name}' (known: {', '.join(SKILLS)})") from None


def generate_splits(name: str, sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Draw ``sum(sizes)`` distinct examples of skill ``name`` from ``seed`` and cut them into
    the named splits, in order (train first). Splits are disjoint by construction: each input
    appears once across all splits."""
    skill = get_skill(name)
    rng = random.Random(f"{name}:{seed}")
    total = sum(sizes.values())
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    attempts = 0
    while len(pairs) < total:
        attempts += 1
        if attempts > 50 * total + 1000:
            raise ConfigError(f"skills.{name}: cannot draw {total} distinct examples (only {len(pairs)} exist)")
        x, y = skill.draw(rng)
        if x in seen:
            continue
        seen.add(x)
        pairs.append((x, y))
    out, i = {}, 0
    for split, n in sizes.items():
        out[split] = [skill.record(x, y) for x, y in pairs[i : i + n]]
        i += n
    return out


def load_capitals() -> list[tuple[str, str]]:
    text = resources.files("mergesweep.zoo").joinpath("data/capitals.tsv").read_text()
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    return [(r["country"], r["capital"]) for r in rows]


def capitals_splits(sizes: dict[str, int], seed: int, n_choices: int = 4) -> dict[str, list[dict]]:
    """Multiple-choice records ``{"question", "choices", "label", "prompt", "target"}`` with
    distractors drawn (seeded) from the other capitals. ``train`` holds the remaining facts as
    plain sentences for pretraining tiny bases."""
    table = load_capitals()
    rng = random.Random(f"capitals:{seed}")
    order = list(range(len(table)))
    rng.shuffle(order)
    need = sizes.get("validation", 0) + sizes.get("test", 0)
    if need > len(table):
        raise ConfigError(f"heldout.capitals: asks for {need} questions, the table has {len(table)}")
    out: dict[str, list[dict]] = {}
    i = 0
    for split in ("validation", "test"):
        recs = []
        for j in order[i : i + sizes.get(split, 0)]:
            country, capital = table[j]
            others = [c for k, (_, c) in enumerate(table) if k != j]
            choices = rng.sample(others, n_choices - 1) + [capital]
            rng.shuffle(choices)
            q = f"Question: What is the capital of {country}?\nAnswer:"
            recs.append({"question": q, "choices": choices, "label": choices.index(capital),
                         "prompt": q, "target": f" {capital}"})
        out[split] = recs
        i += sizes.get(split, 0)
    # every fact, as text, for pretraining a tiny base (the base is *meant* to know capitals)
    out["train"] = [{"prompt": f"Question: What is the capital of {c}?\nAnswer:", "target": f" {k}"} for c, k in table]
    return out
