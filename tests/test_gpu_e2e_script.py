"""scripts/gpu_e2e.py, the GPU end-to-end run, exercised on the CPU with the tiny model: every asset materialized
through Dagster one run at a time, the summary table printed, the JSON written with real per-asset times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from assets_pipeline.definitions import ASSETS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_e2e.py"


@pytest.mark.slow
def test_tiny_end_to_end_on_cpu(tmp_path):
    """Two of the four methods (LoRA, and DreamBooth for its class images): the flow is the same for each, and
    every method's model asset is materialized through Dagster in tests/test_training.py."""
    from assets_pipeline.assets.models import MODEL_ASSETS

    summary_path = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "tiny", "--device", "cpu", "--workdir", str(tmp_path / "work"),
         "--json-out", str(summary_path), "--methods", "lora", "dreambooth"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table_rows = [line.split() for line in proc.stdout.splitlines() if line and not line.startswith(" ")]
    left_out = {"textual_inversion_embedding", "controlnet_model"}
    all_names = {a.key.to_user_string() for a in ASSETS if isinstance(a, dg.AssetsDefinition)}  # not the source
    assert left_out <= all_names and left_out <= {a.key.to_user_string() for a in MODEL_ASSETS}
    names = sorted(all_names - left_out)
    for name in names:  # a row of the final table: asset, status, wall s, ...
        assert any(row[:2] == [name, "ok"] for row in table_rows), (name, proc.stdout[-3000:])

    summary = json.loads(summary_path.read_text())
    assert summary["success"] and summary["shapes"] == "tiny" and summary["device"] == "cpu"
    assert summary["methods"] == ["lora", "dreambooth"]
    assert sorted(r["asset"] for r in summary["assets"]) == names
    assert all(r["status"] == "ok" and r["step_s"] > 0 for r in summary["assets"])
    assert {r["asset"] for r in summary["assets"] if "trainer" in r} == {"lora_adapter", "dreambooth_model"}
    assert all(r["trainer"]["images_per_s"] for r in summary["assets"] if "trainer" in r)
    class_images = next(r for r in summary["assets"] if r["asset"] == "class_images")
    assert class_images["rows"] == 2  # the tiny profile's num_class_images, generated for DreamBooth
    checks = {(c["asset"], c["check"]) for c in summary["checks"]}
    assert ("clip_scored_images", "enough_training_images") in checks
    assert ("dreambooth_model", "changes_base_output") in checks and ("lora_adapter", "changes_base_output") in checks
    assert not {a for a, _ in checks} & left_out
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
