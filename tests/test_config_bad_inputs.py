"""Bad workflow configs: every one stops at start-up with an error naming the key, before any
job runs, and nothing a config says can leave its root or reach a shell unquoted."""

import copy
import subprocess
import sys

import pytest
import yaml

from helpers_pipeline import REPO
from mergesweep.config import load_config_file
from mergesweep.errors import ConfigError
from mergesweep.plan import build_plan

TINY = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
LOCAL = {"type": "local", "path": "/nonexistent/ckpt"}


def _set(path, value):
    """Return a mutation setting cfg[path...] = value (path: tuple of keys/indices)."""
    def mutate(c):
        node = c
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return mutate


CASES = [
    # names are safe path components: no '.', '..', leading dot, separators or shell characters
    ("base-dotdot", _set(("base", "name"), ".."), "base.name"),
    ("expert-dotdot", _set(("experts", 0, "name"), ".."), "experts[0].name"),
    ("expert-dot", _set(("experts", 0, "name"), "."), "experts[0].name"),
    ("expert-climb", _set(("experts", 0, "name"), "../x"), "experts[0].name"),
    ("expert-hidden", _set(("experts", 1, "name"), ".hidden"), "experts[1].name"),
    ("expert-slash", _set(("experts", 2, "name"), "a/b"), "experts[2].name"),
    ("expert-shell", _set(("experts", 0, "name"), "x;rm -rf ~"), "experts[0].name"),
    ("run-name", _set(("name",), "../run"), "name"),
    ("lm-eval-suite-escape", _set(("suites", "lm_eval"), {"../../../escape": ["arc_easy"]}), "suites.lm_eval"),
    ("lm-eval-task-shell", _set(("suites", "lm_eval"), {"ok": ["arc_easy; touch X"]}), "suites.lm_eval.ok"),
    ("lm-eval-suite-clash", _set(("suites", "lm_eval"), {"arithmetic": ["arc_easy"]}), "suites.lm_eval.arithmetic"),
    # every string key that reaches a command has a pattern or an enum
    ("eval-device-shell", _set(("evaluation", "device"), "cpu$(touch X)"), "evaluation.device"),
    ("merge-device-shell", _set(("merge", "device"), "cuda; ls"), "merge.device"),
    ("eval-batch-lots", _set(("evaluation", "batch_size"), "lots"), "evaluation.batch_size"),
    ("eval-batch-shell", _set(("evaluation", "batch_size"), "16; touch X"), "evaluation.batch_size"),
    ("eval-limit-zero", _set(("evaluation", "limit"), 0), "evaluation.limit"),
    ("merge-dtype", _set(("merge", "dtype"), "float8"), "merge.dtype"),
    ("vocab-policy", _set(("merge", "vocab_policy"), "ignore"), "merge.vocab_policy"),
    ("shard-size-word", _set(("merge", "shard_size"), "lots"), "merge.shard_size"),
    ("shard-size-negative", _set(("merge", "shard_size"), -1), "merge.shard_size"),
    ("method-shell", _set(("merges", 0, "method"), "Linear; ls"), "merges[0].method"),
    ("source-file-climb", _set(("base",), {"name": "b", "source": {"type": "pypi_gguf", "file": "../../etc/passwd"}}),
     "base.source.file"),
    ("source-repo-shell", _set(("base",), {"name": "b", "source": {"type": "hub", "repo_id": "org/x; touch X"}}),
     "base.source.repo_id"),
    ("source-revision-shell", _set(("base",), {"name": "b", "source": {"type": "hub", "repo_id": "o/x",
                                                                        "revision": "main$(id)"}}),
     "base.source.revision"),
    ("source-package-shell", _set(("base",), {"name": "b", "source": {"type": "pypi_gguf", "package": "x y"}}),
     "base.source.package"),
    ("source-type", _set(("base",), {"name": "b", "source": {"type": "ftp"}}), "base.source.type"),
    # keys are checked at start-up, unknown keys rejected at every level
    ("unknown-top", lambda c: c.update(mergs=[]), "mergs: unknown key"),
    ("unknown-nested", _set(("finetune", "stepz"), 3), "finetune.stepz: unknown key"),
    ("align-typo", lambda c: c["merges"][0].update(align={"methd": "weight_matching"}), "merges[0].align.methd: unknown key"),
    ("align-method", lambda c: c["merges"][0].update(align={"method": "git_rebasin"}), "merges[0].align.method"),
    ("align-reference", lambda c: c["merges"][0].update(align={"reference": "nobody"}), "merges[0].align.reference"),
    ("align-split", _set(("align",), {"data_split": "holdout"}), "align.data_split"),
    ("local-base-missing", _set(("base",), {"name": "b", "source": LOCAL}), "base.source.path"),
    ("local-expert-missing", lambda c: c["experts"][0].update(source=LOCAL), "experts[0].source.path"),
    ("base-both", lambda c: c["base"].update(source=LOCAL), "base"),
    ("seed-type", _set(("seed",), "zero"), "seed"),
    ("threads-zero", _set(("threads",), 0), "threads"),
    ("skill-unknown", _set(("suites", "skills"), ["juggling"]), "suites.skills[0]"),
    ("expert-old-skill-key", lambda c: c["experts"][1].update(skill=c["experts"][1].pop("domain")),
     "experts[1].skill: unknown key (allowed here: calibration, domain,"),
    ("expert-domain-unknown", _set(("experts", 1, "domain"), "juggling"), "experts[1].domain: 'juggling' is not a suite"),
    ("expert-domain-untrainable", lambda c: (c["suites"].update(lm_eval={"math": ["gsm8k"]}),
                                             c["experts"][1].update(domain="math")),
     "experts[1].domain: 'math' has no training data here"),
    ("no-suites", _set(("suites",), {}), "suites: no suite to evaluate on"),
    ("pretrain-without-data", lambda c: (c.update(suites={"lm_eval": {"math": ["gsm8k"]}}),
                                         c.update(experts=[{"name": "e", "domain": "math", "source": {
                                             "type": "hub", "repo_id": "o/e"}}])),
     "base.pretrain: a pretrained base is trained on the embedded suites' data"),
    ("subsets-too-big", _set(("merges", 0, "experts"), {"subsets": [2, 4]}), "merges[0].experts.subsets: size 4"),
    ("subsets-from-unknown", _set(("merges", 0, "experts"), {"subsets": [2], "from": ["nobody", "tiny-reverse"]}),
     "merges[0].experts.from: 'nobody'"),
    ("subsets-word", _set(("merges", 0, "experts"), {"subsets": "most"}), "merges[0].experts"),
    ("subsets-zero", _set(("merges", 0, "experts"), {"subsets": [0]}), "merges[0].experts"),
    ("subsets-typo", _set(("merges", 0, "experts"), {"subset": [2]}), "merges[0].experts"),
    ("subsets-align-expert", lambda c: c["merges"][0].update(experts={"subsets": [2]},
                                                             align={"reference": "tiny-arithmetic"}),
     "merges[0] (experts tiny-reverse, tiny-dateformat).align.reference: 'tiny-arithmetic' is not one of"),
    ("subsets-per-expert", _set(("merges", 0), {"method": "linear", "experts": {"subsets": [2, 3]},
                                                "params": {"weight": {"per_expert": [0.5, 0.5]}}}),
     "merges[0] (experts tiny-arithmetic, tiny-reverse, tiny-dateformat).params.weight"),
    ("expert-dup", _set(("experts", 1, "name"), "tiny-arithmetic"), "experts[1].name: 'tiny-arithmetic' is used twice"),
    ("finetune-lr", lambda c: c["experts"][0].update(finetune={"lr": -1}), "experts[0].finetune.lr"),
    ("param-type", _set(("merges", 0), {"method": "ties", "params": {"density": "0.5"}}), "merges[0].params.density"),
    ("param-unknown", _set(("merges", 0), {"method": "ties", "params": {"densty": 0.5}}), "merges[0].params.densty"),
    ("param-expert-name", _set(("merges", 0), {"method": "linear", "params": {"weight": {"nobody": 1.0}}}),
     "merges[0].params.weight"),
    ("merge-experts", _set(("merges", 0, "experts"), ["nobody"]), "merges[0].experts"),
    ("grid-empty", _set(("merges", 0), {"method": "ties", "params": {"density": []}}), "merges[0].params.density"),
]


@pytest.mark.parametrize("mutate, key", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_names_the_key(mutate, key):
    cfg = copy.deepcopy(TINY)
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        build_plan(cfg)
    assert str(err.value).startswith(key) or f"{key}:" in str(err.value), str(err.value)


def test_yaml_error_names_file_and_line(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text("name: x\nbase:\n  name: b\n   source: {type: local\n")
    with pytest.raises(ConfigError, match=rf"^{p}:4:\d+: not valid YAML"):
        load_config_file(p)


SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1"]


def test_dotdot_expert_stops_before_touching_resources(tmp_path):
    """A real run: an expert named '..' would make Snakemake delete resources/experts/.. (all of
    resources/); the run must stop at start-up and leave everything in place."""
    keep = tmp_path / "resources" / "checkpoints" / "precious" / "model.safetensors"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"weights")
    cfg = copy.deepcopy(TINY)
    cfg["experts"][0]["name"] = ".."
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(tmp_path / "cfg.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "experts[0].name: '..' is not allowed (a safe name" in proc.stderr + proc.stdout
    assert keep.read_bytes() == b"weights"
    assert not (tmp_path / "results").exists()


def test_shell_metacharacters_in_a_path_are_quoted(tmp_path):
    """A real fetch job whose source path holds shell syntax: the path is passed as one quoted
    argument (nothing runs), and the checkpoint's record carries the plan's uid."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers_merge import make_base

    from mergesweep.record import read_record

    src = tmp_path / "ck $(touch PWNED) `touch PWNED2`; touch PWNED3 'q"
    make_base(src)
    cfg = copy.deepcopy(TINY)
    cfg["base"] = {"name": "b", "source": {"type": "local", "path": str(src)}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([*SNAKEMAKE, "resources/checkpoints/b", "--directory", str(work),
                           "--configfile", str(tmp_path / "cfg.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.rglob("PWNED*")), "a config value was executed by the shell"
    rec = read_record(work / "resources/checkpoints/b")
    assert rec.uid == build_plan(cfg).base.uid and rec.role == "base" and rec.stage == "fetch"
    assert rec.source["path"] == str(src.resolve())


def test_subset_explosion_is_refused_before_it_is_listed():
    """20 experts, every subset: 1,048,555 sets (and as many sweeps) is refused at once with the
    count; a seeded sample of them is fine and drawn without listing the combinations."""
    import time

    cfg = copy.deepcopy(TINY)
    cfg["experts"] = [{"name": f"e{i}", "domain": "arithmetic", "finetune": {"seed": i}} for i in range(20)]
    cfg["merges"] = [{"method": "linear", "experts": {"subsets": "all"}}]
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"^merges\[0\]\.experts\.subsets: 1,048,555 expert sets"):
        build_plan(cfg)
    cfg["merges"][0]["experts"] = {"subsets": [10], "sample": 5}
    plan = build_plan(cfg)
    assert len(plan.merges) == 5 and all(len(m.experts) == 10 for m in plan.merges.values())
    assert time.time() - t0 < 10
