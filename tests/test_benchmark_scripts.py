"""The benchmark scripts run from a checkout at tiny shapes on the CPU and print what docs/benchmarks.md quotes."""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_encoders_prints_a_rate_for_each_encoder_and_batch():
    env = {**os.environ, "ASSETS_PIPELINE_IMAGE_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_encoders.py"), "--shapes", "tiny",
                           "--batch-sizes", "2", "3", "--iters", "1", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted((r["method"], r["batch"]) for r in rows) == sorted(
        (m, b) for m in ("vae_encode", "text_encode", "clip_score", "vae_host", "clip_host") for b in (2, 3))
    assert all(r["images_per_s"] > 0 and r["image_threads"] == 2 and r["device"] == "cpu" for r in rows)
