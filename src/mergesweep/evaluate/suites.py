"""Registered suites of real lm-eval tasks (exact lm-eval task names), as configuration.

A workflow config names them under ``suites.lm_eval`` as a registered suite
(``{math: mergebench_math}``), an explicit task list (``{my_suite: [arc_easy, piqa]}``) or an
object that adds evaluation settings to either (``{math: {suite: mergebench_math, dtype:
bfloat16, validation: {size: 200}}}``, ``{mine: {tasks: [my_task], num_fewshot: 0}}``).
Registered suites need the Hub's datasets (fetched before the evaluation jobs by
``mergesweep prefetch-datasets``; code suites also execute model-written code); the tests check
that every name resolves to a task lm-eval knows.

MergeBench (He et al., 2025, "MergeBench: A Benchmark for Merging Domain-Specialized LLMs")
evaluates five domains; the lm-eval part of its protocol is below. The Open LLM Leaderboard v2
is lm-eval's ``leaderboard`` group.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from mergesweep.errors import ConfigError

#: the per-suite evaluation settings a ``suites.lm_eval`` object may set (None: the
#: ``evaluation:`` value applies); their types and ranges are the schema's
SETTINGS = ("num_fewshot", "apply_chat_template", "limit", "batch_size", "dtype")


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    unsafe_code: bool = False  # tasks that execute model-written code need explicit confirmation
    gen_kwargs: dict = field(default_factory=dict)
    description: str = ""
    # per-suite evaluation settings from the config (None: the `evaluation:` value)
    apply_chat_template: bool | None = None
    limit: int | None = None
    batch_size: int | str | None = None
    dtype: str | None = None
    validation: dict | None = None  # {size, seed}; either may be missing (the `evaluation:` value)


LANGS = ("fr", "es", "de", "ru")

REGISTERED: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("mergebench_math", ("gsm8k_cot",), num_fewshot=8, description="GSM8K chain-of-thought, 8-shot"),
        Suite("mergebench_instruction", ("ifeval",), description="IFEval instruction following"),
        Suite("mergebench_multilingual",
              tuple(f"{b}_{lang}" for b in ("m_mmlu", "arc", "hellaswag") for lang in LANGS),
              description="multilingual MMLU / ARC / HellaSwag in fr, es, de, ru"),
        Suite("mergebench_coding", ("mbpp_plus", "humaneval_plus"), unsafe_code=True,
              description="MBPP+ and HumanEval+ (executes generated code)"),
        Suite("open_llm_leaderboard_v2", ("leaderboard",), description="Open LLM Leaderboard v2 group"),
        Suite("lm_eval_safety", ("toxigen", "truthfulqa_mc2", "crows_pairs_english", "bbq"),
              description="safety-related lm-eval tasks: ToxiGen (toxicity detection), TruthfulQA MC2 "
                          "(truthfulness), CrowS-Pairs English and BBQ (social bias). MergeBench's own "
                          "safety evaluation uses harnesses that are not lm-eval tasks (refusal and "
                          "jailbreak benchmarks judged by other models); they are not included"),
    )
}


def resolve(name: str, value) -> Suite:
    """A ``suites.lm_eval`` entry -> Suite: a registered suite's name, a list of task names, or
    an object ``{tasks: [...] | suite: NAME, <settings>, validation: {size, seed}}``."""
    key = f"suites.lm_eval.{name}"
    if isinstance(value, str):
        if value not in REGISTERED:
            raise ConfigError(f"{key}: unknown registered suite '{value}' (known: {', '.join(REGISTERED)})")
        return REGISTERED[value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
        return Suite(name, tuple(value))
    if isinstance(value, dict):
        allowed = {"tasks", "suite", "validation", *SETTINGS}
        extra = sorted(set(value) - allowed)
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: unknown key (allowed here: {', '.join(sorted(allowed))})")
        if ("tasks" in value) == ("suite" in value):
            raise ConfigError(f"{key}: give exactly one of 'tasks' (lm-eval task names) or 'suite' "
                              "(a registered suite name)")
        if "suite" in value:
            base = resolve(name, value["suite"])
            key_src = f"{key}.suite"
        else:
            base = resolve(name, value["tasks"]) if value["tasks"] else None
            key_src = f"{key}.tasks"
        if base is None:
            raise ConfigError(f"{key_src}: expected a non-empty list of lm-eval task names")
        over = {k: value[k] for k in SETTINGS if value.get(k) is not None}
        validation = value.get("validation")
        if validation is not None:
            if not isinstance(validation, dict) or set(validation) - {"size", "seed"}:
                raise ConfigError(f"{key}.validation: expected an object with 'size' and/or 'seed'")
            over["validation"] = dict(validation)
        return replace(base, **over)
    raise ConfigError(f"{key}: expected a registered suite name, a list of lm-eval task names or an object "
                      "with 'tasks' or 'suite'")


def resolve_all(lm_eval: dict, evaluation: dict) -> dict[str, Suite]:
    """Every ``suites.lm_eval`` entry resolved; ``evaluation.include_paths`` (the user's own
    lm-eval task YAMLs) checked to be directories, as they are needed only when a suite is set."""
    suites = {name: resolve(name, v) for name, v in lm_eval.items()}
    for i, p in enumerate(evaluation.get("include_paths") or ()):
        if not Path(p).expanduser().is_dir():
            raise ConfigError(f"evaluation.include_paths[{i}]: directory {p} not found")
    return suites
