"""The sweep plan: grid expansion, canonical content ids, cross-reference errors naming keys,
every path from the Layout, and no torch at planning time."""

import copy
import subprocess
import sys

import pytest
import yaml

from helpers_pipeline import REPO
from mergesweep.errors import ConfigError
from mergesweep.plan import build_plan


@pytest.fixture()
def cfg():
    return yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())


#: the tiny preset's arithmetic expert's uid before experts declared a `domain` (they said `skill`)
EXPERT_UID_BEFORE_DOMAIN = "tiny-arithmetic@8bd7be06"


def ids_of(cfg, merges):
    c = copy.deepcopy(cfg)
    c["merges"] = merges
    return list(build_plan(c).merges)


def test_grid_expands_to_one_merge_per_point(cfg):
    cfg["merges"] = [{"method": "task_arithmetic", "params": {"lambda": [0.3, 0.5, 1.0]}},
                     {"method": "ties", "params": {"density": [0.2, 0.5], "lambda": [0.5, 1.0]}}]
    plan = build_plan(cfg)
    methods = sorted(m.method for m in plan.merges.values())
    assert methods.count("task_arithmetic") == 3 and methods.count("ties") == 4
    lambdas = sorted(m.params["lambda"] for m in plan.merges.values() if m.method == "task_arithmetic")
    assert lambdas == [0.3, 0.5, 1.0]
    assert len(plan.models) == 1 + 3 + 7
    assert all(plan.model_dir(m) == f"results/models/{m}" for m in plan.merges)


@pytest.mark.parametrize("a, b", [
    ({"method": "linear", "params": {}}, {"method": "linear", "params": {"weight": 1.0, "normalize": True}}),
    ({"method": "ties", "params": {}}, {"method": "ties", "params": {"density": 0.2}}),
    ({"method": "task_arithmetic", "params": {"lambda": 1}}, {"method": "task_arithmetic", "params": {"lambda": 1.0}}),
    # a scalar per-expert value and the same value listed per expert are one merge
    ({"method": "task_arithmetic", "params": {"weight": 0.5}},
     {"method": "task_arithmetic", "params": {"weight": {"per_expert": [0.5, 0.5, 0.5]}}}),
    # order-invariant methods: the order the experts are listed in does not matter
    ({"method": "linear", "experts": ["tiny-arithmetic", "tiny-reverse"],
      "params": {"weight": {"tiny-arithmetic": 0.3, "tiny-reverse": 0.7}}},
     {"method": "linear", "experts": ["tiny-reverse", "tiny-arithmetic"],
      "params": {"weight": {"per_expert": [0.7, 0.3]}}}),
])
def test_equivalent_merges_share_one_id(cfg, a, b):
    assert ids_of(cfg, [a]) == ids_of(cfg, [b])
    assert len(ids_of(cfg, [a, b])) == 1


def test_order_matters_where_the_method_depends_on_it(cfg):
    # DARE's random drop masks are seeded by expert position
    a = {"method": "dare_linear", "experts": ["tiny-arithmetic", "tiny-reverse"], "params": {"density": 0.5}}
    b = {"method": "dare_linear", "experts": ["tiny-reverse", "tiny-arithmetic"], "params": {"density": 0.5}}
    assert ids_of(cfg, [a]) != ids_of(cfg, [b])
    w1 = {"method": "linear", "experts": ["tiny-arithmetic", "tiny-reverse"], "params": {"weight": {"per_expert": [0.3, 0.7]}}}
    w2 = {"method": "linear", "experts": ["tiny-arithmetic", "tiny-reverse"], "params": {"weight": {"per_expert": [0.7, 0.3]}}}
    assert ids_of(cfg, [w1]) != ids_of(cfg, [w2])


@pytest.mark.parametrize("mutate", [
    lambda c: c["merge"].update(dtype="bfloat16"),
    lambda c: c["merge"].update(vocab_policy="truncate"),
    lambda c: c["merges"][0].update(align={"method": "weight_matching", "reference": "base"}),
    lambda c: c["finetune"].update(steps=61),
    lambda c: c["suites"]["sizes"].update(train=999),
    lambda c: c.update(seed=1),
])
def test_every_weight_changing_setting_changes_the_id(cfg, mutate):
    cfg["merges"] = [{"method": "task_arithmetic", "params": {"lambda": 0.5}}]
    before = list(build_plan(cfg).merges)
    mutate(cfg)
    assert set(build_plan(cfg).merges).isdisjoint(before)


def test_settings_that_do_not_change_weights_keep_the_id(cfg):
    before = list(build_plan(cfg).merges)
    cfg["merge"].update(shard_size="500MB", device="cuda")
    cfg["merge"]["dtype"] = None
    cfg["evaluation"].update(batch_size=4)
    assert list(build_plan(cfg).merges) == before
    cfg["merge"]["dtype"] = "bf16"
    assert list(build_plan(cfg).merges) == list(build_plan({**cfg, "merge": {**cfg["merge"], "dtype": "bfloat16"}}).merges)


def test_ids_deterministic_and_change_with_recipe(cfg):
    a = build_plan(cfg)
    cfg2 = copy.deepcopy(cfg)
    cfg2["finetune"]["steps"] += 1
    b = build_plan(cfg2)
    assert set(a.merges).isdisjoint(b.merges)
    assert a.experts["tiny-arithmetic"].uid != b.experts["tiny-arithmetic"].uid
    assert list(a.merges) == list(build_plan(copy.deepcopy(cfg)).merges)


def test_plan_owns_align_jobs_and_paths(cfg):
    cfg["merges"] = [
        {"method": "task_arithmetic", "params": {"lambda": [0.5, 1.0]}, "align": {"method": "weight_matching"}},
        {"method": "linear", "align": {"method": "weight_matching", "reference": "tiny-reverse"}},
    ]
    plan = build_plan(cfg)
    # one job per (model, reference, method), shared by every merge that needs it
    assert sorted(plan.align_jobs) == sorted(
        [(e, "tiny-base", "weight_matching") for e in ("tiny-arithmetic", "tiny-reverse", "tiny-dateformat")]
        + [(e, "tiny-reverse", "weight_matching") for e in ("tiny-arithmetic", "tiny-dateformat")])
    job = plan.align_jobs[("tiny-reverse", "tiny-base", "weight_matching")]
    assert job.perm == "results/align/tiny-reverse--tiny-base--weight_matching/perm.safetensors"
    m = next(m for m in plan.merges.values() if m.method == "linear")
    doc = plan.merge_yaml_doc(m.model_id)
    assert doc["align"] == {"tiny-arithmetic": plan.align_jobs[("tiny-arithmetic", "tiny-reverse", "weight_matching")].perm,
                            "tiny-dateformat": plan.align_jobs[("tiny-dateformat", "tiny-reverse", "weight_matching")].perm}
    assert doc["experts"] == ["resources/experts/tiny-arithmetic", "resources/experts/tiny-reverse",
                              "resources/experts/tiny-dateformat"]


def test_missing_optional_sections_get_schema_defaults(cfg):
    for key in ("sizes", "heldout_sizes"):
        cfg["suites"].pop(key)
    for key in ("merge", "evaluation", "finetune", "threads", "seed"):
        cfg.pop(key)
    plan = build_plan(cfg)
    assert plan.data_sizes("arithmetic") == {"train": 2000, "validation": 32, "test": 64}
    assert plan.data_sizes("capitals") == {"train": 0, "validation": 20, "test": 40}
    assert plan.experts["tiny-reverse"].recipe["steps"] == 60
    assert plan.merge_settings == {"device": "auto", "dtype": None, "shard_size": "2GB", "vocab_policy": "error",
                                   "tie_policy": "error"}
    assert plan.evaluation["batch_size"] == 16 and plan.threads == 2


def test_planning_imports_no_torch():
    code = ("import sys, yaml; from mergesweep.plan import build_plan; "
            f"c = yaml.safe_load(open({str(REPO / 'config/presets/tiny.yaml')!r})); "
            "c['merges'] = [{'method': m} for m in ('linear', 'ties', 'dare_ties', 'slerp', 'tsv')]; "
            "c['merges'][3]['experts'] = ['tiny-arithmetic']; build_plan(c); "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_method_names_the_key(cfg):
    cfg["merges"].append({"method": "frobnicate", "params": {}})
    with pytest.raises(ConfigError, match=r"merges\[2\]\.method: unknown merge method 'frobnicate'"):
        build_plan(cfg)


def test_out_of_range_param_names_the_key(cfg):
    cfg["merges"] = [{"method": "ties", "params": {"density": [0.5, 1.5]}}]
    with pytest.raises(ConfigError, match=r"merges\[0\]\.params\.density: 1\.5 is out of range"):
        build_plan(cfg)


def _five_experts(cfg):
    """The tiny preset with five experts: two more fine-tunes of existing skills."""
    cfg["experts"] += [{"name": "tiny-arithmetic-2", "domain": "arithmetic", "finetune": {"seed": 1}},
                       {"name": "tiny-reverse-2", "domain": "reverse", "finetune": {"seed": 1}}]
    return cfg


def test_expert_subsets_expand_to_every_combination(cfg):
    """5 experts x subsets [2, 3, 4, 5]: C(5,2)+C(5,3)+C(5,4)+C(5,5) = 10+10+5+1 = 26 subsets,
    each merged once per grid point, experts in the config's order."""
    import itertools

    cfg = _five_experts(cfg)
    names = [e["name"] for e in cfg["experts"]]
    cfg["merges"] = [{"method": "task_arithmetic", "experts": {"subsets": [2, 3, 4, 5]},
                      "params": {"lambda": [0.5, 1.0]}}]
    plan = build_plan(cfg)
    sets = [m.experts for m in plan.merges.values()]
    expected = [c for k in (2, 3, 4, 5) for c in itertools.combinations(names, k)]
    assert len(expected) == 26
    assert sorted(set(sets)) == sorted(expected)
    assert len(plan.merges) == 52 and all(sets.count(c) == 2 for c in expected)
    # `all` is every size from 2 to n
    cfg["merges"][0]["experts"] = {"subsets": "all"}
    assert list(build_plan(cfg).merges) == list(plan.merges)


def test_subset_ids_are_canonical(cfg):
    """A subset reached through `subsets` (in any `from` order) has the id of the same experts
    listed by hand in the config's order; a hand-listed entry and a subset entry dedupe."""
    cfg = _five_experts(cfg)
    names = [e["name"] for e in cfg["experts"]]
    by_hand = ids_of(cfg, [{"method": "dare_linear", "experts": [names[0], names[3]], "params": {"density": 0.5}}])
    via_subsets = build_plan({**cfg, "merges": [{"method": "dare_linear", "params": {"density": 0.5},
                                                 "experts": {"subsets": [2], "from": [names[3], names[0]]}}]})
    assert list(via_subsets.merges) == by_hand
    assert via_subsets.merges[by_hand[0]].experts == (names[0], names[3])
    both = ids_of(cfg, [{"method": "dare_linear", "experts": [names[0], names[3]], "params": {"density": 0.5}},
                        {"method": "dare_linear", "experts": {"subsets": [2]}, "params": {"density": 0.5}}])
    assert len(both) == 10 and by_hand[0] in both


def test_suites_of_any_kind_and_roles(cfg):
    """Experts declare a domain among the plan's suites; only the configured embedded suites are
    planned; a suite no expert covers is held out."""
    cfg["suites"] = {"skills": ["arithmetic"], "lm_eval": {"math": ["gsm8k"], "general": ["arc_easy"]}}
    cfg["experts"] = [{"name": "tiny-arithmetic", "domain": "arithmetic"},
                      {"name": "math-expert", "domain": "math", "source": {"type": "hub", "repo_id": "o/math"}}]
    plan = build_plan(cfg)
    assert plan.data_suites == ["arithmetic"]
    assert plan.suites == ["arithmetic", "math", "general"]
    assert plan.domains == ["arithmetic", "math"] and plan.heldout_suites == ["general"]
    assert plan.experts["math-expert"].domain == "math" and plan.experts["math-expert"].stage == "fetch"


def test_domain_keeps_the_expert_uid(cfg):
    """`domain` replaced `skill`: an expert defined the same way keeps its uid (its checkpoint is
    not rebuilt). The uid below was computed by the version that still used `skill`."""
    plan = build_plan(cfg)
    assert plan.experts["tiny-arithmetic"].uid == EXPERT_UID_BEFORE_DOMAIN


def test_subset_sample_is_seeded_and_per_size(cfg):
    """`sample: k` keeps k subsets of each size (all of a size with fewer), the same ones for the
    same seed, others for another seed; adding a size leaves the other sizes' draws alone."""
    from mergesweep.plan import expert_sets

    cfg = _five_experts(cfg)
    plan = build_plan(cfg)

    def sets(**spec):
        return expert_sets(plan, {"experts": spec}, "merges[0]")

    a = sets(subsets=[2, 3, 5], sample=3)
    assert [len(s) for s in a] == [2, 2, 2, 3, 3, 3, 5]
    assert len(set(a)) == 7 and a == sets(subsets=[2, 3, 5], sample=3)
    assert [s for s in sets(subsets=[2, 5], sample=3)] == [s for s in a if len(s) != 3]
    others = [sets(subsets=[2], sample=3, seed=s) for s in range(1, 6)]
    assert any(o != a[:3] for o in others)


def test_alignment_text_for_experts_of_lm_eval_domains(cfg):
    """An align job measures LMC (and activation matching its activations) on embedded text: an
    expert whose domain is an lm-eval suite uses the config's first embedded suite; with none,
    the error names the merge's align key."""
    cfg["suites"] = {"skills": ["reverse"], "lm_eval": {"math": ["gsm8k"]}}
    cfg["experts"] = [{"name": "math-expert", "domain": "math", "source": {"type": "hub", "repo_id": "o/m"}},
                      {"name": "tiny-reverse", "domain": "reverse"}]
    cfg["merges"] = [{"method": "task_arithmetic", "align": {"method": "activation_matching"}}]
    plan = build_plan(cfg)
    jobs = {j.model: j for j in plan.align_jobs.values()}
    assert jobs["math-expert"].lmc_data == jobs["tiny-reverse"].lmc_data == "resources/data/reverse/validation.jsonl"
    assert jobs["math-expert"].data == "resources/data/reverse/train.jsonl"
    cfg["suites"] = {"lm_eval": {"math": ["gsm8k"], "code": ["mbpp"]}}
    cfg["base"] = {"name": "b", "source": {"type": "hub", "repo_id": "o/b"}}
    cfg["experts"][1] = {"name": "code-expert", "domain": "code", "source": {"type": "hub", "repo_id": "o/c"}}
    with pytest.raises(ConfigError, match=r"^merges\[0\]\.align: alignment measures its linear-mode-connectivity"):
        build_plan(cfg)
