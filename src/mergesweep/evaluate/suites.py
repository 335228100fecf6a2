"""Registered suites of real lm-eval tasks (exact lm-eval task names), as configuration.

A workflow config names them under ``suites.lm_eval`` either as a registered suite
(``{math: mergebench_math}``) or as an explicit task list (``{my_suite: [arc_easy, piqa]}``).
They need the Hub's datasets (and, for code, execution of model-written code), so they cannot run
on an offline laptop; the tests check that every name resolves to a task lm-eval knows.

MergeBench (He et al., 2025, "MergeBench: A Benchmark for Merging Domain-Specialized LLMs")
evaluates five domains; the lm-eval part of its protocol is below (its safety suite uses other
harnesses and is not included). The Open LLM Leaderboard v2 is lm-eval's ``leaderboard`` group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mergesweep.errors import ConfigError


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    unsafe_code: bool = False  # tasks that execute model-written code need explicit confirmation
    gen_kwargs: dict = field(default_factory=dict)
    description: str = ""


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
    )
}


def resolve(name: str, value) -> Suite:
    """A ``suites.lm_eval`` entry -> Suite: a registered suite's name, or a list of task names."""
    if isinstance(value, str):
        if value not in REGISTERED:
            raise ConfigError(f"suites.lm_eval.{name}: unknown registered suite '{value}' "
                              f"(known: {', '.join(REGISTERED)})")
        return REGISTERED[value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
        return Suite(name, tuple(value))
    raise ConfigError(f"suites.lm_eval.{name}: expected a registered suite name or a list of lm-eval task names")
