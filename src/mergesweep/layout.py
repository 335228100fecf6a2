"""Where everything lives: the one owner of every path the workflow reads or writes.

The plan (:mod:`mergesweep.plan`) and the Snakemake rules (``workflow/rules/*.smk``) ask the
:class:`Layout` for paths; nothing else spells them. Paths are relative to the workflow's
working directory (strings, as Snakemake wants them). A part given as ``{wildcard}`` yields a
Snakemake pattern; every other part must be a safe path component (:func:`safe_name`), so no
name from a config can climb out of its root.

::

    resources/checkpoints/<name>/        fetched or pretrained base, fetched experts
    resources/experts/<name>/            experts fine-tuned here
    resources/data/<suite>/              generated skill data (train/validation/test.jsonl)
    resources/tasks/<suite>/             lm-eval task YAMLs over that data
    resources/downloads/                 wheel cache of pypi_gguf sources
    results/stats/<stats_id>/{stats.safetensors,stats.json}   per-expert statistics (data-aware merges)
    results/calibration/<suite>.jsonl    an lm-eval suite's validation examples (calibration data)
    results/merges/<model_id>.yaml       the merge YAML (`mergesweep merge --config` input)
    results/models/<model_id>/           merged checkpoints (a LoRA-native merge: a PEFT adapter)
    results/reverted/<model_id>/         tasks reverted from a reversible merge (RMM): <merge id>--<expert>
    results/align/<model>--<ref>--<method>/{perm.safetensors,summary.json}
    results/lmc/<model>--<ref>--<method>.{json,png}
    results/evals/<model_id>/<suite>.json
    results/search/<search_id>/{generation-NNNN.json,result.json}   a search's generations, its result
    results/evaluation.json, results/evaluation_models.json   evaluation spec; models the aggregate reads
    results/datasets.json                the lm-eval datasets fetched before the evaluations
    results/tables/{scores,leaderboard,selection,pareto,lmc}.parquet, provenance.json
    results/leaderboard.md, results/report/{report.html,<figure>.png}
    results/logs/<stage>/...log
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from mergesweep.errors import ConfigError

#: a safe path component: letters, digits, ``_.-``; no leading dot (so never ``.`` or ``..``)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_WILDCARD = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")

LEADERBOARD_TABLES = ("leaderboard", "selection", "pareto")
FIGURES = ("bars", "heatmap", "sensitivity", "pareto")
#: the report's figures of a run with searches (only then)
SEARCH_FIGURES = ("search_convergence", "search_fronts")


def safe_name(value: str, key: str = "name") -> str:
    """``value`` if it is a safe path component, else ConfigError naming ``key``."""
    if not isinstance(value, str) or not SAFE_NAME.match(value):
        raise ConfigError(
            f"{key}: {value!r} is not a safe name (letters, digits and '_.-', not starting with '.'; "
            "no path separators)"
        )
    return value


def _part(value: str) -> str:
    """A safe component, where ``{wildcard}`` placeholders (Snakemake patterns) stand for safe names."""
    safe_name(_WILDCARD.sub("x", value), "path component")
    return value


@dataclass(frozen=True)
class Layout:
    """Every path of a run. ``resources`` and ``results`` are the two roots."""

    resources: str = "resources"
    results: str = "results"

    def _under(self, root: str, *parts: str, suffix: str = "") -> str:
        checked = [_part(p) for p in parts]
        if suffix:
            checked[-1] += suffix
        path = PurePosixPath(root, *checked)
        if ".." in path.parts[len(PurePosixPath(root).parts):]:
            raise ConfigError(f"path {path} leaves {root}/")
        return str(path)

    # -- inputs ----------------------------------------------------------------------------------
    def checkpoint(self, name: str) -> str:
        """A fetched or pretrained checkpoint (the base, fetched experts)."""
        return self._under(self.resources, "checkpoints", name)

    def trained_expert(self, name: str) -> str:
        return self._under(self.resources, "experts", name)

    def data(self, suite: str) -> str:
        return self._under(self.resources, "data", suite)

    def data_split(self, suite: str, split: str) -> str:
        return self._under(self.resources, "data", suite, split, suffix=".jsonl")

    def tasks(self, suite: str) -> str:
        return self._under(self.resources, "tasks", suite)

    @property
    def downloads(self) -> str:
        return self._under(self.resources, "downloads")

    # -- statistics, merges and alignment --------------------------------------------------------
    def calibration_data(self, suite: str) -> str:
        """An lm-eval suite's validation examples, the calibration data of experts in that domain."""
        return self._under(self.results, "calibration", suite, suffix=".jsonl")

    def stats_dir(self, stats_id: str) -> str:
        """The statistics of one (model, kind, calibration data, settings): ``mergesweep stats --out``."""
        return self._under(self.results, "stats", stats_id)

    def merge_yaml(self, model_id: str) -> str:
        return self._under(self.results, "merges", model_id, suffix=".yaml")

    def merged_model(self, model_id: str) -> str:
        return self._under(self.results, "models", model_id)

    def reverted_model(self, model_id: str) -> str:
        """A task's adapter reverted from a reversible merge (``ids.reverted_model_id``)."""
        return self._under(self.results, "reverted", model_id)

    def search_dir(self, search_id: str) -> str:
        """A search's generation files and result (mergesweep.search.state names the files)."""
        return self._under(self.results, "search", search_id)

    def search_generation(self, search_id: str, generation: int | str) -> str:
        """``results/search/<id>/generation-NNNN.json`` (``generation``: an int, or a wildcard)."""
        from mergesweep.search.state import generation_path

        if isinstance(generation, int):
            return str(generation_path(self.search_dir(search_id), generation))
        return self._under(self.results, "search", search_id, f"generation-{generation}.json")

    def search_result(self, search_id: str) -> str:
        return self._under(self.results, "search", search_id, "result.json")

    def align_dir(self, model: str, reference: str, method: str) -> str:
        return self._under(self.results, "align", f"{model}--{reference}--{method}")

    def perm_map(self, model: str, reference: str, method: str) -> str:
        return f"{self.align_dir(model, reference, method)}/perm.safetensors"

    def align_summary(self, model: str, reference: str, method: str) -> str:
        return f"{self.align_dir(model, reference, method)}/summary.json"

    def lmc(self, model: str, reference: str, method: str, ext: str) -> str:
        return self._under(self.results, "lmc", f"{model}--{reference}--{method}", suffix=f".{ext}")

    # -- evaluation and tables -------------------------------------------------------------------
    def eval_json(self, model_id: str, suite: str) -> str:
        return self._under(self.results, "evals", model_id, suite, suffix=".json")

    @property
    def evals_dir(self) -> str:
        """The directory of every evaluation JSON (``<evals_dir>/<model_id>/<suite>.json``)."""
        return self._under(self.results, "evals")

    @property
    def eval_models(self) -> str:
        """The models and suites the run evaluated, as ``mergesweep aggregate --models`` reads them."""
        return self._under(self.results, "evaluation_models.json")

    @property
    def eval_spec(self) -> str:
        """The evaluation spec every evaluation job reads (its suites and options)."""
        return self._under(self.results, "evaluation.json")

    @property
    def datasets_manifest(self) -> str:
        """What `mergesweep prefetch-datasets` fetched for the lm-eval suites (and where)."""
        return self._under(self.results, "datasets.json")

    def table(self, name: str) -> str:
        return self._under(self.results, "tables", name, suffix=".parquet")

    @property
    def provenance(self) -> str:
        return self._under(self.results, "tables", "provenance.json")

    @property
    def leaderboard_md(self) -> str:
        return self._under(self.results, "leaderboard.md")

    @property
    def report_html(self) -> str:
        return self._under(self.results, "report", "report.html")

    def figure(self, name: str) -> str:
        return self._under(self.results, "report", name, suffix=".png")

    def leaderboard_outputs(self) -> dict[str, str]:
        """Every file ``mergesweep leaderboard --out-dir <results>`` writes."""
        out = {name: self.table(name) for name in LEADERBOARD_TABLES}
        # one row per task reverted from a reversible merge (RMM) against its expert (empty without)
        out["reversible"] = self.table("reversible")
        out["markdown"] = self.leaderboard_md
        out["report"] = self.report_html
        out.update({f"fig_{name}": self.figure(name) for name in FIGURES})
        return out

    def log(self, stage: str, *parts: str) -> str:
        return self._under(self.results, "logs", stage, *parts, suffix=".log")
