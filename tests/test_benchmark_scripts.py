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


@pytest.mark.slow
def test_bench_training_compares_a_flow_family_with_the_scripts_loop(tmp_path):
    """--shapes tiny-flux: the reference loop (train_dreambooth_lora_flux.py's step) beside the project's trainer
    over an int8 base (--config), each row with its denoiser FLOPs per image, the ratio and the denoiser's bytes."""
    out = tmp_path / "runs.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--shapes", "tiny-flux",
                           "--methods", "lora", "--batch-sizes", "1", "--variants", "reference", "project-eager",
                           "--steps", "1", "--device", "cpu", "--config", "base_quantization=int8",
                           "--workdir", str(tmp_path / "work"), "--json-out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"reference", "project-eager[base_quantization=int8]"}, proc.stdout[-2000:]
    flops = {r["flops_per_image"] for r in rows.values()}
    assert len(flops) == 1 and flops.pop() > 0  # the same denoiser, 2 x its forward
    assert all(r["images_per_s"] > 0 and r["shapes"] == "tiny-flux" for r in rows.values())
    assert 0 < rows["project-eager[base_quantization=int8]"]["denoiser_gib"]
    table = proc.stdout.split("\n\n")[-1]
    assert "x ref" in table and "project-eager[base_quantization=int8]" in table and "TFLOP/s" in table
    # The U-Net families' plain loops are not built for a transformer: refused before any run.
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--shapes", "tiny-sd3",
                              "--variants", "plain-eager"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode == 2 and "built for the U-Net families" in refused.stderr
