"""scripts/gpu_e2e.py, the GPU end-to-end run, exercised on the CPU with the tiny model: every asset materialized
through Dagster one run at a time, the summary table printed, the JSON written with real per-asset times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from assets_pipeline.definitions import ASSETS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_e2e.py"


@pytest.mark.slow
def test_tiny_end_to_end_on_cpu(tmp_path):
    summary_path = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "tiny", "--device", "cpu", "--workdir", str(tmp_path / "work"),
         "--json-out", str(summary_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table_rows = [line.split() for line in proc.stdout.splitlines() if line and not line.startswith(" ")]
    names = [a.key.to_user_string() for a in ASSETS]
    for name in names:  # a row of the final table: asset, status, wall s, ...
        assert any(row[:2] == [name, "ok"] for row in table_rows), (name, proc.stdout[-3000:])

    summary = json.loads(summary_path.read_text())
    assert summary["success"] and summary["shapes"] == "tiny" and summary["device"] == "cpu"
    assert sorted(r["asset"] for r in summary["assets"]) == sorted(names)
    assert all(r["status"] == "ok" and r["step_s"] > 0 for r in summary["assets"])
    assert {r["asset"] for r in summary["assets"] if "trainer" in r} == {
        "lora_adapter", "dreambooth_model", "textual_inversion_embedding", "controlnet_model"}
    checks = {(c["asset"], c["check"]) for c in summary["checks"]}
    assert ("clip_scored_images", "enough_training_images") in checks
    assert ("dreambooth_model", "changes_base_output") in checks and len(checks) == 14
    assert all(c["passed"] for c in summary["checks"])
    assert (tmp_path / "work" / "dagster_home" / "dagster.yaml").is_file()  # its own instance, in the workdir


def test_missing_dependency_is_named(tmp_path):
    """A Python without the project's packages: exit 2, naming what is missing and how to provide it."""
    proc = subprocess.run([sys.executable, "-S", "-I", str(SCRIPT), "--shapes", "tiny", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "diffusers (import diffusers)" in proc.stderr and "dagster (import dagster)" in proc.stderr
    assert "scripts/device_wheels.sh" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written before the check
