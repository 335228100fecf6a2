"""Planning data-aware merges: stats jobs (one per expert, kind, calibration data and settings,
shared by every merge that reads them), calibration data of whole-model merges, and the data's
identity in the merged model's id."""

from __future__ import annotations

import pytest
import yaml

from helpers_pipeline import REPO
from mergesweep.errors import ConfigError
from mergesweep.plan import build_plan


@pytest.fixture()
def cfg():
    return yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())


def data_merges(cfg, merges):
    cfg["merges"] = merges
    return build_plan(cfg)


def test_stats_jobs_are_shared_by_every_merge_that_reads_them(cfg):
    plan = data_merges(cfg, [{"method": "regmean", "params": {"reduce_non_diagonal_ratio": [0.5, 1.0]}},
                             {"method": "fisher", "params": {}}])
    from mergesweep.merge.identity import data_needs

    fisher_kind = data_needs("fisher", {}, 3)[0]  # which Fisher the defaults read
    assert fisher_kind in (("fisher",), ("fisher_model",))
    kinds = sorted((j.model, j.kind) for j in plan.stats_jobs.values())
    assert kinds == sorted((e, k) for e in plan.experts for k in ("gram", fisher_kind[0]))
    regmeans = [m for m in plan.merges.values() if m.method == "regmean"]
    assert len(regmeans) == 2 and regmeans[0].stats == regmeans[1].stats  # the second plans no stats job
    for m in regmeans:
        assert [jobs[0].kind for jobs in m.stats] == ["gram"] * 3
        assert [jobs[0].model for jobs in m.stats] == list(m.experts)
        doc = plan.merge_yaml_doc(m.model_id)
        assert doc["stats"] == {e: jobs[0].dir for e, jobs in zip(m.experts, m.stats)}
        assert all(d.startswith("results/stats/") for d in doc["stats"].values())
    # calibration data: each expert's own embedded domain, the configured split (never test)
    for job in plan.stats_jobs.values():
        assert job.calibration.path == f"resources/data/{plan.experts[job.model].domain}/train.jsonl"


def test_the_statistics_identity_is_part_of_the_merge_id(cfg):
    merges = [{"method": "regmean", "params": {}}, {"method": "linear", "params": {}}]
    a = data_merges(dict(cfg), merges)
    cfg2 = dict(cfg, stats={"examples": 7})
    b = data_merges(cfg2, merges)
    ids = lambda p, m: [k for k, v in p.merges.items() if v.method == m]
    assert ids(a, "regmean") != ids(b, "regmean")  # other statistics, another merge
    assert ids(a, "linear") == ids(b, "linear")  # weight-only merges keep their ids
    assert set(a.stats_jobs).isdisjoint(b.stats_jobs)
    c = data_merges(dict(cfg, stats={"split": "validation"}), merges)
    assert ids(c, "regmean") != ids(a, "regmean")
    assert all(j.calibration.path.endswith("/validation.jsonl") for j in c.stats_jobs.values())


def test_whole_model_merges_get_calibration_data_and_no_stats_job(cfg):
    plan = data_merges(cfg, [{"method": "localize_stitch", "params": {"dataless": [True, False]}}])
    assert plan.stats_jobs == {}
    streamed, whole = sorted(plan.merges.values(), key=lambda m: m.calibration is not None)
    assert streamed.calibration is None and "calibration" not in plan.merge_yaml_doc(streamed.model_id)
    doc = plan.merge_yaml_doc(whole.model_id)
    assert [c["path"] for c in doc["calibration"].values()] == [
        f"resources/data/{plan.experts[e].domain}/train.jsonl" for e in whole.experts]
    assert doc["calibration_settings"] == plan.calibration_settings
    assert doc["device"] == plan.config["stats"]["device"]  # forward passes: the stats stage's device


def test_calibration_data_of_an_lm_eval_domain_or_a_file(cfg, tmp_path):
    """An lm-eval-domain expert reads its suite's validation examples (rule calibration_data); a
    configured file wins; a held-out domain without train data is an error naming the key."""
    cfg["suites"]["lm_eval"] = {"math": ["gsm8k"]}
    cfg["experts"][2] = {"name": "math-expert", "domain": "math", "source": {"type": "hub", "repo_id": "o/math"}}
    cfg["merges"] = [{"method": "regmean", "params": {}}]
    plan = build_plan(cfg)
    job = next(j for j in plan.stats_jobs.values() if j.model == "math-expert")
    assert job.calibration.path == "results/calibration/math.jsonl" == job.calibration.input
    assert job.calibration.identity["lm_eval_suite"] == "math" and plan.calibration_suites == ["math"]
    assert job.calibration.identity["validation"] == {"size": 100, "seed": 0}
    cfg["experts"][2]["calibration"] = "resources/data/arithmetic/test.jsonl"
    with pytest.raises(ConfigError, match=r"experts\[2\]\.calibration: resources/data/arithmetic/test.jsonl is a test "
                                          r"split; calibration data never comes from the examples a model is ranked on"):
        build_plan(cfg)
    cfg["experts"][2]["calibration"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r"experts\[2\]\.calibration: file .*missing.jsonl not found"):
        build_plan(cfg)
    f = tmp_path / "math.jsonl"
    f.write_text('{"text": "2+2=4"}\n')
    cfg["experts"][2]["calibration"] = str(f)
    plan = build_plan(cfg)
    job = next(j for j in plan.stats_jobs.values() if j.model == "math-expert")
    assert job.calibration.path == str(f) and "sha256" in job.calibration.identity and not plan.calibration_suites
    first = set(plan.merges)
    f.write_text('{"text": "2+2=5"}\n')  # other data, other statistics, another merge
    assert set(build_plan(cfg).merges).isdisjoint(first)
    cfg["experts"][2] = {"name": "capitals-expert", "domain": "capitals", "source": {"type": "hub", "repo_id": "o/c"}}
    with pytest.raises(ConfigError, match=r"experts\[2\]\.calibration: merges\[0\]\.method reads calibration data "
                                          r"of 'capitals-expert', whose domain 'capitals' is a held-out suite without "
                                          r"a train split \(set stats.split: validation\)"):
        build_plan(cfg)
    cfg["stats"] = {"split": "validation"}
    assert build_plan(cfg)


def test_bad_data_settings_name_the_key(cfg):
    cfg["merges"] = [{"method": "regmean", "params": {}, "align": {"method": "weight_matching"}}]
    with pytest.raises(ConfigError, match=r"merges\[0\]\.align: method 'regmean' reads data of the experts"):
        build_plan(cfg)
    cfg["merges"] = [{"method": "regmean", "params": {}}]
    for stats, key in [({"split": "test"}, "stats.split"), ({"examples": 0}, "stats.examples"),
                       ({"device": "tpu"}, "stats.device"), ({"sample": 3}, "stats")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_plan(dict(cfg, stats=stats))


def test_cost_counts_stats_jobs_and_whole_model_merges(cfg):
    from mergesweep.cost import stage_costs

    plan = data_merges(cfg, [{"method": "regmean", "params": {}}, {"method": "fisher", "params": {}},
                             {"method": "localize_stitch", "params": {"dataless": False}}])
    rows = {c.rule: c for c in stage_costs(plan)}
    assert rows["stats"].jobs == 6 and rows["stats"].gpus_per_job == 1  # stats.device: auto
    assert rows["merge"].jobs == 2 and rows["merge (whole-model)"].jobs == 1
    assert rows["merge (whole-model)"].gpus_per_job == 1
