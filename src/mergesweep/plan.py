"""The sweep plan: from a workflow config to every job, path and id of the run, computed once.

The Snakemake rules (``workflow/rules/*.smk``) call :func:`build_plan` once and only look things
up in it; everything that decides *what* is computed lives here, is importable without
Snakemake (and without torch), and is unit-tested.

- :func:`mergesweep.config.validate_config` checks every key and fills the defaults (the schema
  owns them); :func:`build_plan` then checks what a schema cannot: cross-references (an expert's
  domain, a merge's experts and subsets, an alignment reference), merge parameters against each method's
  spec, merge settings with the parsers ``mergesweep merge`` uses, paths of local sources.
- Paths come from :class:`mergesweep.layout.Layout`.
- Ids: the base and experts keep their configured names as model ids and get a *uid*
  (``name@hash``) covering their whole definition (source or recipe, and the base's uid), which
  the stage that writes them records in their ``mergesweep.json``. A merged model's id comes
  from :func:`mergesweep.merge.identity.merge_identity` over the *resolved* parameters, the
  inputs' uids, the alignment jobs' uids, dtype and vocabulary policy: the function
  ``mergesweep merge`` uses too, so the same merge has one id wherever it is run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesweep.config import validate_config
from mergesweep.errors import ConfigError
import re

from mergesweep.ids import MERGE_ID_PATTERN, definition_uid, short_hash
from mergesweep.layout import Layout, safe_name

_MERGE_ID = re.compile(MERGE_ID_PATTERN)
#: expert sets one ``merges[]`` entry may expand to (each is a sweep of merges and evaluations)
MAX_EXPERT_SETS = 20_000


def _model_name(value: str, key: str) -> str:
    """A base's or expert's name: a safe name that cannot be mistaken for a merged model's id."""
    safe_name(value, key)
    if _MERGE_ID.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} looks like a merged model id (<method>-<10 hex digits>); "
                          "choose another name")
    return value


@dataclass(frozen=True)
class Checkpoint:
    """The base or an expert: where it comes from and where it lives."""

    name: str
    role: str  # base | expert
    stage: str  # fetch | pretrain | finetune: the rule that makes it
    uid: str
    dir: str
    domain: str | None = None
    source: dict | None = None
    recipe: dict | None = None  # pretrain, finetune or extract settings
    #: a PEFT LoRA adapter over the base (fetched, fine-tuned with finetune.method lora, or
    #: extracted from a dense expert), not a dense checkpoint
    adapter: bool = False


@dataclass(frozen=True)
class AlignJob:
    """Permutation map of ``model`` onto ``reference`` (and its LMC curve)."""

    model: str
    reference: str
    method: str
    uid: str
    perm: str
    summary: str
    lmc_json: str
    lmc_plot: str
    data: str | None  # split file for activation matching
    lmc_data: str
    seed: int
    max_iter: int


@dataclass(frozen=True)
class Calibration:
    """One expert's calibration data: a JSONL file from its own domain (never a test split)."""

    model: str
    path: str  # the file the stats job / whole-model merge reads
    input: str  # what the workflow waits for: the generated suite's directory, or the file itself
    identity: dict  # what defines the data (hashed into uids): generated suite + split + sizes + seed, or sha256
    uid: str  # mergesweep.merge.identity.calibration_uid(identity, settings)


@dataclass(frozen=True)
class StatsJob:
    """Statistics of one kind (``gram``, ``fisher``...) of one model on its calibration data."""

    stats_id: str  # also the uid a merge's id hashes (recorded in stats.json)
    model: str
    kind: str
    calibration: Calibration
    dir: str


@dataclass(frozen=True)
class Merge:
    model_id: str
    method: str
    params: dict  # resolved: defaults filled, per-expert values as lists
    experts: tuple[str, ...]
    align: tuple[AlignJob | None, ...] | None  # per expert (None: the reference itself)
    entry: int  # index in config["merges"] (-1: a search's candidate only)
    dir: str
    yaml: str
    stats: tuple[tuple[StatsJob, ...], ...] | None = None  # per expert: the statistics the method reads
    calibration: tuple[Calibration, ...] | None = None  # per expert: whole-model methods' data
    #: a reversible merge (RMM): its output is a basis + per-task coefficients, not a model; each
    #: expert's task is reverted from it (:class:`Reverted`) and evaluated on its domain instead
    reversible: bool = False


@dataclass(frozen=True)
class Reverted:
    """One task's model reverted from a reversible merge, evaluated on that task's domain only."""

    model_id: str  # mergesweep.ids.reverted_model_id(merge, expert)
    merge: str
    expert: str
    domain: str
    dir: str


@dataclass(frozen=True)
class Search:
    """One ``search[i]`` of the config: generations of merges of ``method`` over ``experts``, each
    planned by ``strategy`` from the previous generation's validation scores (mergesweep.search).
    Its candidates are ordinary plan merges (content ids), registered as their generation files
    appear (:meth:`Plan.search_generation_ids`)."""

    search_id: str  # mergesweep.ids.search_id: results/search/<search_id>/
    label: str  # the leaderboard's method label: name, or "<strategy>:<method>"
    entry: int  # index in config["search"]
    strategy: str
    method: str
    experts: tuple[str, ...]
    config: dict  # the entry as make_search takes it (objective suites filled in)
    dir: str
    #: objective suite -> the expert whose validation score normalises it (empty: raw scores)
    reference: dict = field(default_factory=dict)


@dataclass
class Plan:
    config: dict  # validated, defaults filled
    layout: Layout
    base: Checkpoint
    experts: dict[str, Checkpoint]
    skills: list[str]
    heldout: list[str]
    lm_eval_suites: dict[str, Any]  # name -> mergesweep.evaluate.suites.Suite
    merges: dict[str, Merge] = field(default_factory=dict)
    align_jobs: dict[tuple[str, str, str], AlignJob] = field(default_factory=dict)
    stats_jobs: dict[str, StatsJob] = field(default_factory=dict)
    reverted: dict[str, Reverted] = field(default_factory=dict)
    searches: dict[str, Search] = field(default_factory=dict)
    #: merges the ``merges:`` section plans (a search's candidate may also be one of them)
    grid_merges: set = field(default_factory=set)
    #: per search: the merge id of each proposal, generation by generation (as registered)
    search_ids: dict[str, list[list[str]]] = field(default_factory=dict)

    # -- what is in the run ----------------------------------------------------------------------
    @property
    def suites(self) -> list[str]:
        return [*self.skills, *self.heldout, *self.lm_eval_suites]

    @property
    def data_suites(self) -> list[str]:
        """Suites whose data and task YAMLs the workflow generates (only those the config lists)."""
        return [*self.skills, *self.heldout]

    @property
    def domains(self) -> list[str]:
        """Suites that are some expert's domain, in suite order (the leaderboard normalises these
        by their expert); every other suite is held out."""
        used = {e.domain for e in self.experts.values()}
        return [s for s in self.suites if s in used]

    @property
    def heldout_suites(self) -> list[str]:
        """Suites no expert is specialised in: forgetting / generalisation against the base."""
        used = {e.domain for e in self.experts.values()}
        return [s for s in self.suites if s not in used]

    @property
    def models(self) -> list[str]:
        """The models evaluated on every suite: base, experts and every merge but reversible ones
        (whose tasks are evaluated as :attr:`reverted` models, each on its domain)."""
        return [self.base.name, *self.experts, *self.evaluated_merges]

    @property
    def evaluated_merges(self) -> list[str]:
        return [k for k, m in self.merges.items() if not m.reversible]

    def model_suites(self) -> dict[str, list[str]]:
        """Models evaluated on some suites only: each reverted model on its domain."""
        return {r.model_id: [r.domain] for r in self.reverted.values()}

    @property
    def fetched(self) -> list[Checkpoint]:
        return [c for c in (self.base, *self.experts.values()) if c.stage == "fetch"]

    @property
    def trained_experts(self) -> list[str]:
        return [n for n, e in self.experts.items() if e.stage == "finetune"]

    @property
    def extracted_experts(self) -> list[str]:
        """Experts that are LoRA adapters extracted from another (dense) expert of the plan."""
        return [n for n, e in self.experts.items() if e.stage == "extract"]

    def base_names(self) -> list[str]:
        """Names an adapter's ``base_model_name_or_path`` may give for this plan's base: its
        name, ``base.hf_id`` and a hub source's ``repo_id``."""
        b = self.config["base"]
        names = [self.base.name, b.get("hf_id"), (self.base.source or {}).get("repo_id")]
        return [n for n in dict.fromkeys(names) if n]

    def checkpoint(self, name: str) -> Checkpoint:
        if name == self.base.name:
            return self.base
        if name in self.experts:
            return self.experts[name]
        raise ConfigError(f"'{name}' is neither the base nor an expert of this plan")

    def model_dir(self, model_id: str) -> str:
        if model_id in self.merges:
            return self.merges[model_id].dir
        if model_id in self.reverted:
            return self.reverted[model_id].dir
        return self.checkpoint(model_id).dir

    def role(self, model_id: str) -> str:
        if model_id in self.reverted:
            return "reverted"
        return "merged" if model_id in self.merges else self.checkpoint(model_id).role

    def uid(self, model_id: str) -> str:
        return model_id if model_id in self.merges or model_id in self.reverted else self.checkpoint(model_id).uid

    # -- settings (validated, defaults filled) ---------------------------------------------------
    @property
    def threads(self) -> int:
        return self.config["threads"]

    @property
    def merge_settings(self) -> dict:
        return self.config["merge"]

    @property
    def evaluation(self) -> dict:
        return self.config["evaluation"]

    @property
    def calibration_settings(self) -> dict:
        """Records per expert, tokens per sequence, batch size of the calibration data (the
        ``stats`` section over :data:`mergesweep.merge.settings.CALIBRATION_DEFAULTS`)."""
        from mergesweep.merge.settings import CALIBRATION_DEFAULTS

        st = self.config["stats"]
        return {k: st.get(k, v) for k, v in CALIBRATION_DEFAULTS.items()}

    @property
    def calibration_suites(self) -> list[str]:
        """lm-eval suites whose validation examples some merge reads as calibration data."""
        out = {c.path: c.identity["lm_eval_suite"] for c in self._calibrations() if "lm_eval_suite" in c.identity}
        return sorted(set(out.values()))

    def _calibrations(self):
        for m in self.merges.values():
            yield from m.calibration or ()
        for j in self.stats_jobs.values():
            yield j.calibration

    @property
    def stats_seed(self) -> int:
        return self.config["stats"].get("seed", self.config["seed"])

    def data_sizes(self, suite: str) -> dict:
        """Examples per split of a generated suite (held-out suites have no train split)."""
        s = self.config["suites"]
        if suite in self.heldout:
            return {"train": 0, **s["heldout_sizes"]}
        return dict(s["sizes"])

    # -- outputs ---------------------------------------------------------------------------------
    def eval_jsons(self) -> list[str]:
        every = [self.layout.eval_json(m, s) for m in self.models for s in self.suites]
        return every + [self.layout.eval_json(m, s) for m, suites in self.model_suites().items() for s in suites]

    def eval_models_doc(self, candidates: bool = True) -> dict:
        """``results/evaluation_models.json``: what the aggregate reads (every model on every suite;
        ``model_suites``: models evaluated on some suites only, the reverted tasks; ``searches``:
        each search's label, id and result file; ``search_only``: the merges only a search planned).
        ``candidates=False``: without the searches' candidates (the rule's params: they are known
        once the searches finish)."""
        models = self.models if candidates else [m for m in self.models if m not in self.merges or m in self.grid_merges]
        doc: dict[str, Any] = {"models": [*models, *self.reverted], "suites": self.suites}
        if self.reverted:
            doc["model_suites"] = self.model_suites()
        if self.searches:
            doc["searches"] = [{"label": s.label, "id": s.search_id, "result": self.layout.search_result(s.search_id)}
                               for s in self.searches.values()]
            if candidates:
                doc["search_only"] = [m for m in self.evaluated_merges if m not in self.grid_merges]
        return doc

    # -- searches --------------------------------------------------------------------------------
    def search_strategy(self, search_id: str, reference: dict | None = None):
        """The search's strategy (mergesweep.search.make_search). ``reference``: the objective
        suites' expert validation scores (None: placeholders of 1, for checking the config only)."""
        from mergesweep.search import make_search

        s = self.searches[search_id]
        if reference is None and s.reference:
            reference = {q: 1.0 for q in s.reference}
        return make_search(s.config, experts=list(s.experts), suites=self.suites, reference=reference,
                           key=f"search[{s.entry}]")

    def search_generation_ids(self, search_id: str, generation: int) -> list[str]:
        """The merge id of each proposal of generation ``generation`` of a search (its file must
        exist), registering the proposals as plan merges; ``[]``: the search is finished."""
        from mergesweep.search.state import generation_path, load_generation

        known = self.search_ids.setdefault(search_id, [])
        if generation < len(known):
            return known[generation]
        s = self.searches[search_id]
        for g in range(len(known), generation + 1):
            gen = load_generation(generation_path(s.dir, g))
            known.append([_plan_merge_set(self, {"method": s.method}, f"search[{s.entry}] (generation {g})",
                                          f"search[{s.entry}]", -1, s.method, s.experts, [p.params])[0]
                          for p in gen.proposals])
        return known[generation]

    def load_searches(self) -> None:
        """Register every proposal of every generation file on disk (a job's process rebuilds
        the plan and finds the candidates the submitting process planned)."""
        from mergesweep.search.state import generation_files

        for sid, s in self.searches.items():
            n = len(generation_files(s.dir))
            if n:
                self.search_generation_ids(sid, n - 1)

    def eval_spec_doc(self) -> dict:
        """The evaluation spec: every suite in order and the evaluation options; exactly what
        ``mergesweep evaluate --spec`` takes (mergesweep.evaluate.runner.read_spec)."""
        suites = []
        for name in self.suites:
            if name in self.lm_eval_suites:
                s = self.lm_eval_suites[name]
                # a suite's own settings (None: the options' value applies)
                suites.append({"name": name, "lm_eval_tasks": list(s.tasks), "num_fewshot": s.num_fewshot,
                               "unsafe_code": s.unsafe_code, "apply_chat_template": s.apply_chat_template,
                               "limit": s.limit, "batch_size": s.batch_size, "dtype": s.dtype,
                               "validation": s.validation})
            else:
                suites.append({"name": name, "tasks_dir": self.layout.tasks(name)})
        e = self.evaluation
        options = {k: e[k] for k in ("batch_size", "device", "limit", "log_samples", "backend", "dtype",
                                     "apply_chat_template", "num_fewshot", "include_paths")}
        options["validation"] = {"size": e["validation"]["size"],
                                 "seed": e["validation"].get("seed", self.config["seed"])}
        return {"suites": suites, "options": options}

    @property
    def keep_models(self) -> str:
        return self.config["keep_models"]

    def merge_yaml_doc(self, model_id: str) -> dict:
        """The merge YAML of one merge: exactly what ``mergesweep merge --config`` takes."""
        m = self.merges[model_id]
        s = self.merge_settings
        doc: dict[str, Any] = {
            "method": m.method,
            "base": self.base.dir,
            "experts": [self.model_dir(e) for e in m.experts],
            "expert_names": list(m.experts),
            "params": m.params,
            # a whole-model merge runs forward passes: on the stats stage's device (and resources)
            "device": self.config["stats"]["device"] if m.calibration else s["device"],
            "shard_size": s["shard_size"],
            "vocab_policy": s["vocab_policy"],
            "tie_policy": s["tie_policy"],
            "dtype": s["dtype"],
        }
        if m.align:
            doc["align"] = {e: job.perm for e, job in zip(m.experts, m.align) if job is not None}
        if m.stats:
            # one statistics directory per expert (a method reads one kind per expert)
            doc["stats"] = {e: jobs[0].dir for e, jobs in zip(m.experts, m.stats)}
        if m.calibration:
            doc["calibration"] = {e: {"path": c.path, "uid": c.uid} for e, c in zip(m.experts, m.calibration)}
            doc["calibration_settings"] = self.calibration_settings
        return doc


def build_plan(config: dict, layout: Layout | None = None) -> Plan:
    """Validate ``config`` and expand it into every job of the run.

    Raises ConfigError naming the key (``merges[1].params.density``, ``experts[0].domain``...)."""
    from mergesweep.evaluate.suites import resolve_all
    from mergesweep.merge.settings import canonical_dtype, check_device, check_vocab_policy, parse_size

    cfg = validate_config(config)
    layout = layout or Layout()
    suites = cfg["suites"]
    skills, heldout = list(suites["skills"]), list(suites["heldout"])
    lm_eval = resolve_all(suites["lm_eval"], cfg["evaluation"])
    clash = set(lm_eval) & set(skills + heldout)
    if clash:
        raise ConfigError(f"suites.lm_eval.{sorted(clash)[0]}: the name is already a skill or held-out suite")
    all_suites = [*skills, *heldout, *lm_eval]
    if not all_suites:
        raise ConfigError("suites: no suite to evaluate on: list embedded suites (suites.skills, suites.heldout) "
                          "or lm-eval suites (suites.lm_eval)")

    # merge settings, parsed as `mergesweep merge` parses them
    ms = cfg["merge"]
    ms["dtype"] = canonical_dtype(ms["dtype"], "merge.dtype")
    check_device(ms["device"], "merge.device")
    check_vocab_policy(ms["vocab_policy"], "merge.vocab_policy")
    parse_size(ms["shard_size"], "merge.shard_size")
    check_device(cfg["evaluation"]["device"], "evaluation.device")
    if cfg["evaluation"]["backend"] == "vllm" and cfg["evaluation"]["device"] == "cpu":
        raise ConfigError("evaluation.backend: vllm runs on a GPU, but evaluation.device is cpu")
    from mergesweep import resources

    resources.check(cfg)

    base = _base(cfg, layout)
    experts: dict[str, Checkpoint] = {}
    for i, e in enumerate(cfg["experts"]):
        key = f"experts[{i}]"
        name = _model_name(e["name"], f"{key}.name")
        if name in experts or name == base.name:
            raise ConfigError(f"{key}.name: '{name}' is used twice")
        domain = e["domain"]
        if domain not in all_suites:
            raise ConfigError(f"{key}.domain: '{domain}' is not a suite of this config "
                              f"(suites: {', '.join(all_suites)})")
        if e.get("source") and e.get("extract"):
            raise ConfigError(f"{key}.extract: an expert is fetched (source) or extracted from another expert "
                              "(extract), not both")
        if not e.get("source") and not e.get("extract") and domain not in skills:
            raise ConfigError(
                f"{key}.domain: '{domain}' has no training data here: an expert without a source is fine-tuned "
                f"on an embedded skill's train split ({', '.join(skills) or 'none listed in suites.skills'}); "
                "give the expert a source (hub or local) or a skill domain")
        experts[name] = None if e.get("extract") else _expert(cfg, e, key, base, layout)
    for i, e in enumerate(cfg["experts"]):  # extractions, once every expert they may read is known
        if e.get("extract"):
            experts[e["name"]] = _extracted_expert(e, f"experts[{i}]", base, experts, layout)

    plan = Plan(config=cfg, layout=layout, base=base, experts=experts, skills=skills, heldout=heldout,
                lm_eval_suites=lm_eval)
    for i, m in enumerate(cfg["merges"]):
        _plan_merges(plan, m, f"merges[{i}]", i)
    plan.grid_merges = set(plan.merges)
    for i, entry in enumerate(cfg["search"]):
        _plan_search(plan, entry, i)
    plan.load_searches()
    return plan


def _plan_search(plan: Plan, entry: dict, i: int) -> None:
    """Check one ``search[i]`` entry (every error names the key) and add it to the plan."""
    from mergesweep.ids import search_id
    from mergesweep.merge.identity import data_needs
    from mergesweep.merge.methods import REGISTRY

    key = f"search[{i}]"
    method = entry["method"]
    if method not in REGISTRY:
        raise ConfigError(f"{key}.method: unknown merge method '{method}' (known: {', '.join(sorted(REGISTRY))})")
    spec = REGISTRY[method]
    if spec.reversible:
        raise ConfigError(f"{key}.method: '{method}' is reversible (its output is a basis, not a model to "
                          "score); search over a method whose output is a model")
    names = entry.get("experts") or list(plan.experts)
    for j, n in enumerate(names):
        if n not in plan.experts:
            raise ConfigError(f"{key}.experts[{j}]: '{n}' is not an expert (experts: {', '.join(plan.experts)})")
    names = tuple(names)
    try:
        kinds, whole = data_needs(method, {}, len(names), list(names))
    except ConfigError:
        kinds, whole = (), False
    if kinds or whole:
        raise ConfigError(f"{key}.method: '{method}' reads data of the experts (statistics or calibration "
                          "passes); a search runs weight-only methods")
    config = {k: v for k, v in entry.items() if k not in ("name", "experts")}
    # the default objective: the mean normalised validation score over the experts' domains (the
    # leaderboard's selection score), each suite divided by its expert's validation score
    objective = config.get("objective")
    domains = [q for q in plan.suites if q in {plan.experts[n].domain for n in names}]
    if objective is None or isinstance(objective, dict) and "suites" not in objective:
        objective = {**(objective or {}), "suites": domains}
    elif isinstance(objective, list):
        objective = {"suites": objective}
    config["objective"] = objective
    reference: dict[str, str] = {}
    if isinstance(objective, dict) and objective.get("normalise", True) is not False:
        for j, q in enumerate(objective.get("suites") or []):
            owners = [n for n in names if plan.experts[n].domain == q]
            if q in plan.suites and not owners:
                raise ConfigError(f"{key}.objective.suites[{j}]: suite '{q}' is no expert's domain among the "
                                  "search's experts, so there is no expert score to normalise it by; set "
                                  f"{key}.objective.normalise: false or drop the suite")
            if owners:
                reference[q] = owners[0]
    config["objective"] = {**objective, "normalise": bool(reference)} if isinstance(objective, dict) else objective
    label = entry.get("name") or f"{entry.get('strategy')}:{method}"
    for other in plan.searches.values():
        if other.label == label:
            raise ConfigError(f"{key}.name: the label '{label}' is search[{other.entry}]'s too; give one of them "
                              "a name")
    ms = plan.merge_settings
    definition = {"search": config, "base": plan.base.uid, "experts": [plan.experts[n].uid for n in names],
                  "dtype": ms["dtype"], "vocab_policy": ms["vocab_policy"], "evaluation": plan.config["evaluation"],
                  "suites": plan.config["suites"], "seed": plan.config["seed"]}
    sid = search_id(entry.get("strategy", "search"), method, definition)
    search = Search(sid, label, i, entry.get("strategy"), method, names, config, plan.layout.search_dir(sid),
                    reference)
    plan.searches[sid] = search
    plan.search_strategy(sid)  # every check of the strategy, its space and objective, naming the key


def _check_local_source(src: dict | None, key: str) -> None:
    if src and src["type"] == "local":
        if "path" not in src:
            raise ConfigError(f"{key}.path: a local source needs a path")
        if not Path(src["path"]).expanduser().is_dir():
            raise ConfigError(f"{key}.path: directory {src['path']} not found")
    if src and src["type"] == "hub" and "repo_id" not in src:
        raise ConfigError(f"{key}.repo_id: a hub source needs a repo_id")


def _base(cfg: dict, layout: Layout) -> Checkpoint:
    b = cfg["base"]
    name = _model_name(b["name"], "base.name")
    source = b.get("source")
    _check_local_source(source, "base.source")
    if source and _is_adapter_source(source):
        raise ConfigError("base.source: a LoRA adapter cannot be the base (it changes a model, it is not one); "
                          "name its base model here and list the adapter as an expert")
    pretrain = None if source else {**b["pretrain"], "seed": b["pretrain"].get("seed", cfg["seed"])}
    if pretrain and not (cfg["suites"]["skills"] or cfg["suites"]["heldout"]):
        raise ConfigError("base.pretrain: a pretrained base is trained on the embedded suites' data, but the "
                          "config lists none (suites.skills, suites.heldout); give the base a source instead")
    definition = {"source": source, "pretrain": pretrain}
    if pretrain:  # a pretrained base also depends on the data it is trained on
        definition["data"] = {"skills": cfg["suites"]["skills"], "heldout": cfg["suites"]["heldout"],
                              "sizes": cfg["suites"]["sizes"], "seed": cfg["seed"]}
    return Checkpoint(name=name, role="base", stage="fetch" if source else "pretrain",
                      uid=definition_uid(name, definition), dir=layout.checkpoint(name),
                      source=source, recipe=pretrain)


def _is_adapter_source(source: dict) -> bool:
    """A source declared as a LoRA adapter, or a local directory holding ``adapter_config.json``."""
    if source.get("adapter"):
        return True
    return source["type"] == "local" and (Path(source["path"]).expanduser() / "adapter_config.json").is_file()


def _expert(cfg: dict, e: dict, key: str, base: Checkpoint, layout: Layout) -> Checkpoint:
    name = e["name"]
    source = e.get("source")
    _check_local_source(source, f"{key}.source")
    if source:
        definition = {"source": source, "skill": e["domain"], "base": base.uid}
        return Checkpoint(name=name, role="expert", stage="fetch", uid=definition_uid(name, definition),
                          dir=layout.checkpoint(name), domain=e["domain"], source=source,
                          adapter=_is_adapter_source(source))
    from mergesweep.zoo.cli_finetune import finetune_recipe

    # method and lora enter the recipe only for a LoRA fine-tune (full fine-tunes keep their uids)
    recipe = finetune_recipe(cfg["finetune"], e.get("finetune"), f"{key}.finetune")
    recipe.setdefault("seed", cfg["seed"])
    # "skill" is the key the uid was first computed with: kept so existing experts keep their uid
    definition = {"skill": e["domain"], "finetune": recipe, "base": base.uid,
                  "data": {"sizes": cfg["suites"]["sizes"], "seed": cfg["seed"]}}
    return Checkpoint(name=name, role="expert", stage="finetune", uid=definition_uid(name, definition),
                      dir=layout.trained_expert(name), domain=e["domain"], recipe=recipe,
                      adapter=recipe.get("method") == "lora")


def _extracted_expert(e: dict, key: str, base: Checkpoint, experts: dict, layout: Layout) -> Checkpoint:
    """A LoRA adapter extracted from a dense expert of the plan (``experts[i].extract``)."""
    name, ex = e["name"], e["extract"]
    src = experts.get(ex["from"])
    if src is None or src.adapter:
        dense = ", ".join(n for n, c in experts.items() if c is not None and not c.adapter) or "none"
        what = ("is a LoRA adapter already" if src is not None else
                "is extracted itself" if ex["from"] in experts else "is not an expert of this config")
        raise ConfigError(f"{key}.extract.from: '{ex['from']}' {what}; extraction reads a dense expert "
                          f"(here: {dense})")
    recipe = {"from": ex["from"], "rank": ex["rank"]}
    definition = {"extract": {"from": src.uid, "rank": ex["rank"]}, "base": base.uid}
    return Checkpoint(name=name, role="expert", stage="extract", uid=definition_uid(name, definition),
                      dir=layout.trained_expert(name), domain=e["domain"], recipe=recipe, adapter=True)


def _align_text_suite(plan: Plan, model: str, key: str) -> str:
    """The generated suite whose text an align job uses (activation matching, the LMC curve): the
    expert's domain when it is a generated suite, else the first generated suite of the config."""
    domain = plan.experts[model].domain if model in plan.experts else None
    if domain in plan.data_suites:
        return domain
    if plan.data_suites:
        return plan.data_suites[0]
    raise ConfigError(f"{key}: alignment measures its linear-mode-connectivity curve (and activation matching "
                      "its activations) on text of an embedded suite, but the config lists none; add one to "
                      "suites.skills or suites.heldout, or drop the align key")


def _align_job(plan: Plan, model: str, reference: str, method: str, key: str = "align") -> AlignJob:
    jkey = (model, reference, method)
    if jkey in plan.align_jobs:
        return plan.align_jobs[jkey]
    acfg = plan.config["align"]
    seed = acfg.get("seed", plan.config["seed"])
    skill = _align_text_suite(plan, model, key)
    uid = "align@" + short_hash({"model": plan.uid(model), "reference": plan.uid(reference), "method": method,
                                 "seed": seed, "max_iter": acfg["max_iter"],
                                 "data": [skill, acfg["data_split"]] if method == "activation_matching" else None})
    L = plan.layout
    job = AlignJob(
        model=model, reference=reference, method=method, uid=uid,
        perm=L.perm_map(model, reference, method), summary=L.align_summary(model, reference, method),
        lmc_json=L.lmc(model, reference, method, "json"), lmc_plot=L.lmc(model, reference, method, "png"),
        data=L.data_split(skill, acfg["data_split"]) if method == "activation_matching" else None,
        lmc_data=L.data_split(skill, acfg["lmc_split"]), seed=seed, max_iter=acfg["max_iter"],
    )
    plan.align_jobs[jkey] = job
    return job


def expert_sets(plan: Plan, m: dict, key: str) -> list[tuple[str, ...]]:
    """The expert lists one ``merges[]`` entry merges: its ``experts`` list (default: every
    expert), or every combination of ``experts.subsets`` sizes (``all``: 2 .. n) drawn from
    ``experts.from`` (default: every expert), or ``experts.sample`` of them per size (a seeded
    draw: ``experts.seed``, else the config's seed). Combinations keep the config's expert order,
    so a subset has one canonical order and so one id per grid point, however it was reached."""
    spec = m.get("experts")
    if not isinstance(spec, dict):
        names = list(spec or plan.experts)
        for n in names:
            if n not in plan.experts:
                raise ConfigError(f"{key}.experts: '{n}' is not a configured expert ({', '.join(plan.experts)})")
        return [tuple(names)]
    pool = list(spec.get("from") or plan.experts)
    for n in pool:
        if n not in plan.experts:
            raise ConfigError(f"{key}.experts.from: '{n}' is not a configured expert ({', '.join(plan.experts)})")
    order = {n: i for i, n in enumerate(plan.experts)}
    pool.sort(key=order.__getitem__)
    sizes = spec["subsets"]
    if sizes == "all":
        sizes = list(range(2, len(pool) + 1))
        if not sizes:
            raise ConfigError(f"{key}.experts.subsets: 'all' needs at least two experts to choose from "
                              f"(there is {len(pool)})")
    too_big = [k for k in sizes if k > len(pool)]
    if too_big:
        raise ConfigError(f"{key}.experts.subsets: size {too_big[0]} is larger than the {len(pool)} expert(s) "
                          f"to choose from ({', '.join(pool)})")
    n_sets = sum(min(math.comb(len(pool), k), spec.get("sample") or math.comb(len(pool), k)) for k in sizes)
    if n_sets > MAX_EXPERT_SETS:
        raise ConfigError(f"{key}.experts.subsets: {n_sets:,} expert sets (more than {MAX_EXPERT_SETS:,}); draw "
                          "some of each size with experts.sample")
    sets = []
    for k in sorted(sizes):
        if spec.get("sample") and spec["sample"] < math.comb(len(pool), k):
            import random

            # seeded by (seed, size): adding a size to the list does not change the other sizes' draws
            rng = random.Random(f"{spec.get('seed', plan.config['seed'])}:{k}")
            picked = _sample_combinations(len(pool), k, spec["sample"], rng)
            sets.extend(tuple(pool[i] for i in c) for c in picked)
            continue
        combos = list(itertools.combinations(pool, k))
        sets.extend(combos)
    return sets


def _sample_combinations(n: int, k: int, count: int, rng) -> list[tuple[int, ...]]:
    """``count`` distinct k-subsets of ``range(n)``, drawn uniformly with ``rng`` (without
    listing every combination: C(40, 20) is 1.4e11), in lexicographic order."""
    picked: set[tuple[int, ...]] = set()
    while len(picked) < count:
        picked.add(tuple(sorted(rng.sample(range(n), k))))
    return sorted(picked)


def _plan_merges(plan: Plan, m: dict, key: str, entry: int) -> None:
    from mergesweep.merge.grid import expand_grid
    from mergesweep.merge.methods import REGISTRY

    method = m["method"]
    if method not in REGISTRY:
        raise ConfigError(f"{key}.method: unknown merge method '{method}' (known: {', '.join(sorted(REGISTRY))})")
    sets = expert_sets(plan, m, key)
    try:
        points = expand_grid(m["params"])
    except ConfigError as err:
        raise ConfigError(f"{key}.{err}") from None
    subsets = isinstance(m.get("experts"), dict)
    for names in sets:
        # a subset's error says which subset: ``merges[2] (experts a, b).params.weight: ...``
        where = f"{key} (experts {', '.join(names)})" if subsets else key
        _plan_merge_set(plan, m, where, key, entry, method, names, points)


def _plan_merge_set(plan: Plan, m: dict, where: str, key: str, entry: int, method: str,
                    names: tuple[str, ...], points: list[dict]) -> list[str]:
    """Plan one merge per point (a resolved parameter set) of ``method`` over ``names``; returns
    their ids in point order (an id planned before is not planned again)."""
    from mergesweep.merge.identity import merge_identity

    align = None
    if m.get("align") is not None:
        a = m["align"]
        ref = a.get("reference", "base")
        ref = plan.base.name if ref == "base" else ref
        if ref != plan.base.name and ref not in plan.experts:
            raise ConfigError(f"{key}.align.reference: '{ref}' is neither 'base' nor an expert")
        if ref != plan.base.name and ref not in names:
            raise ConfigError(f"{where}.align.reference: '{ref}' is not one of the experts merged; with "
                              "expert subsets align onto the base (reference: base)")
        align = tuple(None if e == ref else _align_job(plan, e, ref, a["method"], f"{key}.align") for e in names)
    from mergesweep.ids import reverted_model_id
    from mergesweep.merge.identity import data_needs
    from mergesweep.merge.methods import REGISTRY

    spec = REGISTRY[method]
    lora = [n for n in names if plan.experts[n].adapter]
    if spec.merge_adapters is not None and len(lora) < len(names):
        dense = next(n for n in names if not plan.experts[n].adapter)
        raise ConfigError(f"{where}.method: '{method}' merges LoRA adapters, but expert '{dense}' is a dense "
                          "checkpoint (fine-tune it with finetune.method: lora, fetch an adapter, or extract one "
                          "with experts[i].extract)")
    if lora and align:
        raise ConfigError(f"{key}.align: expert '{lora[0]}' is a LoRA adapter; alignment permutes dense checkpoints")

    ms = plan.merge_settings
    ids = []
    for point in points:
        try:
            kinds, whole = data_needs(method, point, len(names), list(names))
        except ConfigError as err:
            raise ConfigError(f"{where}.{err}") from None
        stats = calibration = data_uids = None
        if (kinds or whole) and lora:
            raise ConfigError(f"{where}.method: '{method}' runs the experts as models (statistics or calibration "
                              f"passes), but expert '{lora[0]}' is a LoRA adapter; merge adapters with a streaming "
                              "method (task_arithmetic, ties, ...) or a LoRA-native one (lora_lego, rmm, knots)")
        if kinds or whole:
            if align:
                raise ConfigError(f"{key}.align: method '{method}' reads data of the experts themselves "
                                  "(statistics or calibration data); it cannot be combined with align")
            calibration = tuple(_calibration(plan, n, f"{where}.method") for n in names)
            if kinds:
                stats = tuple(tuple(_stats_job(plan, c, kind) for kind in kinds) for c in calibration)
                data_uids = [jobs[0].stats_id for jobs in stats]
                calibration = None
            else:
                data_uids = [c.uid for c in calibration]
        try:
            mid, params = merge_identity(
                method, point, names, plan.base.uid, [plan.experts[n].uid for n in names],
                align_uids=[j.uid if j else None for j in align] if align else None,
                dtype=ms["dtype"], vocab_policy=ms["vocab_policy"], data_uids=data_uids,
            )
        except ConfigError as err:
            raise ConfigError(f"{where}.{err}") from None
        ids.append(mid)
        if mid not in plan.merges:
            plan.merges[mid] = Merge(mid, method, params, tuple(names), align, entry,
                                     plan.layout.merged_model(mid), plan.layout.merge_yaml(mid),
                                     stats=stats, calibration=calibration, reversible=spec.reversible)
            if spec.reversible:  # each task reverted from the basis, evaluated on its expert's domain
                for n in names:
                    rid = reverted_model_id(mid, n)
                    plan.reverted[rid] = Reverted(rid, mid, n, plan.experts[n].domain,
                                                  plan.layout.reverted_model(rid))
    return ids


def _calibration(plan: Plan, model: str, key: str) -> Calibration:
    """An expert's calibration data: the file ``experts[i].calibration`` names; else its embedded
    domain's ``stats.split`` file; else, for an lm-eval domain, that suite's validation examples
    (``mergesweep calibration-data``, rule ``calibration_data``)."""
    from mergesweep.merge.identity import calibration_uid

    e = plan.experts[model]
    split = plan.config["stats"]["split"]
    settings = plan.calibration_settings
    i = list(plan.experts).index(model)
    if plan.config["experts"][i].get("calibration"):
        return _calibration_file(plan, model, i, settings)
    if e.domain in plan.data_suites and not (split == "train" and plan.data_sizes(e.domain)["train"] == 0):
        identity = {"suite": e.domain, "split": split, "sizes": plan.data_sizes(e.domain), "seed": plan.config["seed"]}
        return Calibration(model, plan.layout.data_split(e.domain, split), plan.layout.data(e.domain), identity,
                           calibration_uid(identity, settings))
    if e.domain in plan.lm_eval_suites:
        # the suite's validation examples, as its evaluation splits them (never a test example)
        spec = next(x for x in plan.eval_spec_doc()["suites"] if x["name"] == e.domain)
        identity = {"lm_eval_suite": e.domain, "tasks": spec["lm_eval_tasks"],
                    "validation": {**plan.eval_spec_doc()["options"]["validation"], **(spec["validation"] or {})},
                    "include_paths": plan.evaluation["include_paths"]}
        out = plan.layout.calibration_data(e.domain)
        return Calibration(model, out, out, identity, calibration_uid(identity, settings))
    what = ("is a held-out suite without a train split (set stats.split: validation)"
            if e.domain in plan.data_suites else "has no data here")
    raise ConfigError(f"experts[{i}].calibration: {key} reads calibration data of '{model}', whose domain "
                          f"'{e.domain}' {what}; or give a JSONL file (records with text, or prompt and target) "
                      "from that domain, not its test split")


def _calibration_file(plan: Plan, model: str, i: int, settings: dict) -> Calibration:
    """The JSONL file ``experts[i].calibration`` names, identified by its content."""
    from mergesweep.merge.identity import calibration_uid
    from mergesweep.record import sha256_file

    path = plan.config["experts"][i]["calibration"]
    tests = {Path(plan.layout.data_split(x, "test")).resolve() for x in plan.data_suites}
    if Path(path).expanduser().resolve() in tests:
        raise ConfigError(f"experts[{i}].calibration: {path} is a test split; calibration data never comes from "
                          "the examples a model is ranked on (use the train or validation split)")
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"experts[{i}].calibration: file {path} not found")
    identity = {"sha256": sha256_file(Path(path).expanduser())}
    return Calibration(model, path, path, identity, calibration_uid(identity, settings))


def _stats_job(plan: Plan, calib: Calibration, kind: str) -> StatsJob:
    """The stats job of (model, kind, calibration data, settings): one per content, shared by
    every merge that reads it."""
    settings = {**plan.calibration_settings, "seed": plan.stats_seed}
    h = short_hash({"model": plan.uid(calib.model), "kind": kind, "data": calib.identity, "settings": settings})
    stats_id = f"{calib.model}--{kind}--{h}"
    if stats_id not in plan.stats_jobs:
        plan.stats_jobs[stats_id] = StatsJob(stats_id, calib.model, kind, calib, plan.layout.stats_dir(stats_id))
    return plan.stats_jobs[stats_id]


def config_hash(config: dict) -> str:
    return short_hash(config, 16)


def provenance(plan: Plan, root: str | Path = ".") -> dict:
    """The run's provenance: config hash, each base's/expert's record (uid, source, its own
    fingerprint), library versions."""
    from mergesweep.record import library_versions, read_record

    root = Path(root)
    ckpts = {}
    for c in (plan.base, *plan.experts.values()):
        rec = read_record(root / c.dir)
        if rec.uid != c.uid:
            raise ConfigError(
                f"{c.dir}: its record has uid {rec.uid!r} but the plan expects {c.uid!r} "
                "(the checkpoint was made from another definition: delete it to rebuild)"
            )
        src = rec.source or {}
        ckpts[c.name] = {"role": rec.role, "uid": rec.uid, "stage": rec.stage, "source": src.get("type"),
                         "revision": src.get("revision") or src.get("repo_id"), "sha256": src.get("sha256"),
                         "fingerprint": rec.fingerprint}
    return {"config_hash": config_hash(plan.config), "config": plan.config, "checkpoints": ckpts,
            "versions": library_versions(),
            "merges": {k: {"method": m.method, "params": m.params, "experts": list(m.experts),
                           **({"stats": [jobs[0].stats_id for jobs in m.stats]} if m.stats else {}),
                           **({"calibration": [c.uid for c in m.calibration]} if m.calibration else {})}
                       for k, m in plan.merges.items()}}
