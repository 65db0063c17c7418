"""Retention: replaced versions lose their weights beyond the newest N, never the current one, and keep their
audit trail (lineage, metrics, validation images); the lineage CLI still answers for them, marked pruned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assets_pipeline.retention import PRUNED_FILE, prune_asset, pruned_record, versions

SHA = "ab" * 32


def make_version(asset_dir: Path, stamp: str) -> Path:
    folder = asset_dir / f"{stamp}-run"
    (folder / "unet").mkdir(parents=True)
    (folder / "validation").mkdir()
    weights = {"unet/diffusion_pytorch_model.safetensors": 3000, "pytorch_lora_weights.safetensors": 500}
    for rel, size in weights.items():
        (folder / rel).write_bytes(b"w" * size)
    (folder / "lineage.json").write_text(json.dumps({
        "concept": "rex", "method": "lora", "created_at": stamp, "run_id": stamp,
        "weights": {rel: {"tensors_sha256": "x"} for rel in weights},
        "training_images": [{"image_sha256": SHA, "role": "instance", "caption": "c", "source_path": "a.png"}]}))
    for name in ("metrics.json", "SHA256SUMS", "loss.png", "validation/grid.png"):
        (folder / name).write_text("kept")
    return folder


@pytest.fixture
def asset_dir(tmp_path) -> Path:
    folder = tmp_path / "artifacts" / "concepts" / "rex" / "lora_adapter"
    for stamp in ("20261101T000000Z", "20261102T000000Z", "20261103T000000Z", "20261104T000000Z"):
        make_version(folder, stamp)
    (folder / ".20261105T000000Z-run.tmp").mkdir()  # an unfinished output: never a version
    return folder


def test_weights_beyond_the_newest_n_are_pruned_and_the_audit_trail_stays(asset_dir):
    old = versions(asset_dir)
    assert [p.name[:8] for p in old] == ["20261101", "20261102", "20261103", "20261104"]
    pruned = prune_asset(asset_dir, current=old[-1], keep=2)
    assert [p.folder for p in pruned] == old[:2] and all(p.bytes == 3500 for p in pruned)
    for folder in old[:2]:
        assert not list(folder.rglob("*.safetensors")) and not (folder / "unet").exists()  # emptied folder gone
        for name in ("lineage.json", "metrics.json", "SHA256SUMS", "loss.png", "validation/grid.png"):
            assert (folder / name).is_file(), name
        assert pruned_record(folder)["bytes"] == 3500
    for folder in old[2:]:
        assert len(list(folder.rglob("*.safetensors"))) == 2 and pruned_record(folder) is None
    assert prune_asset(asset_dir, current=old[-1], keep=2) == []  # idempotent


def test_the_current_version_is_never_pruned_even_when_older_than_the_newest_n(asset_dir):
    """A rollback points current.json at an older version: it keeps its weights."""
    old = versions(asset_dir)
    prune_asset(asset_dir, current=old[0], keep=1)
    assert len(list(old[0].rglob("*.safetensors"))) == 2
    assert [pruned_record(f) is not None for f in old] == [False, True, True, False]


def test_dry_run_deletes_nothing_and_keep_must_be_positive(asset_dir):
    before = sorted(asset_dir.rglob("*"))
    assert len(prune_asset(asset_dir, current=None, keep=1, dry_run=True)) == 3
    assert sorted(asset_dir.rglob("*")) == before
    with pytest.raises(ValueError, match="keep >= 1"):
        prune_asset(asset_dir, current=None, keep=0)


def test_cli_prunes_every_output_and_lineage_marks_pruned_versions(asset_dir, monkeypatch, capsys):
    from assets_pipeline.cli import main

    root = asset_dir.parents[2]
    (asset_dir / "current.json").write_text(json.dumps({"path": versions(asset_dir)[-1].name}))
    monkeypatch.setenv("ASSETS_PIPELINE_ARTIFACTS", str(root))
    monkeypatch.setenv("ASSETS_PIPELINE_DATA", str(root.parent / "data"))
    assert main(["prune", "--keep", "3", "--dry-run"]) == 0
    assert "would prune" in capsys.readouterr().out and not any(pruned_record(f) for f in versions(asset_dir))
    assert main(["prune", "--keep", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("pruned  ") == 1 and "freed 3.4 KiB" in out
    assert main(["lineage", "image", SHA, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["weights_pruned"], r["current"]) for r in rows] == [(True, False)] + [(False, False)] * 2 \
        + [(False, True)]
    first = versions(asset_dir)[0]
    assert main(["lineage", "output", str(first)]) == 0
    captured = capsys.readouterr()
    assert "a.png" in captured.out and "weights were pruned" in captured.err
    assert (first / PRUNED_FILE).is_file()
    assert main(["prune", "--keep", "0"]) == 2


def test_a_version_with_a_damaged_record_keeps_its_weights_and_the_others_are_pruned(asset_dir):
    """Issue 28, point 11: a damaged lineage.json or PRUNED.json of one version is skipped with a warning naming
    it; the other versions are pruned as usual."""
    old = versions(asset_dir)
    (old[0] / "lineage.json").write_text('{"concept": "rex", "weig')
    (old[1] / PRUNED_FILE).write_text("")
    warnings: list[str] = []
    pruned = prune_asset(asset_dir, current=old[-1], keep=1, warn=warnings.append)
    assert [p.folder for p in pruned] == [old[2]]
    assert [len(list(f.rglob("*.safetensors"))) for f in old] == [2, 2, 0, 2]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{old[0] / 'lineage.json'}: not valid JSON, damaged or cut short")
    assert "restore it from a backup" in warnings[0] and f"the weights of {old[0].name} are not pruned" in warnings[0]
    assert warnings[1].startswith(f"{old[1] / PRUNED_FILE}: empty") and "or delete it" in warnings[1]


def test_prune_skips_an_output_whose_current_json_is_damaged_and_prunes_the_others(asset_dir, monkeypatch, capsys):
    """Issue 28, point 11: a truncated current.json broke `prune` (a traceback). Which version must keep its
    weights is unknown, so none of that output's is pruned, with a warning naming the file and what to do; the
    other outputs are pruned, and the exit status (1) says something was skipped."""
    from assets_pipeline.cli import main

    root = asset_dir.parents[2]
    other = asset_dir.parent / "dreambooth_model"
    for stamp in ("20261101T000000Z", "20261102T000000Z", "20261103T000000Z"):
        make_version(other, stamp)
    (other / "current.json").write_text(json.dumps({"path": versions(other)[-1].name}))
    pointer = asset_dir / "current.json"
    pointer.write_text('{"path": "2026')
    monkeypatch.setenv("ASSETS_PIPELINE_ARTIFACTS", str(root))
    monkeypatch.setenv("ASSETS_PIPELINE_DATA", str(root.parent / "data"))
    assert main(["prune", "--keep", "1"]) == 1
    out = capsys.readouterr()
    assert [pruned_record(f) is not None for f in versions(other)] == [True, True, False]
    assert not any(pruned_record(f) for f in versions(asset_dir))
    assert all(len(list(f.rglob("*.safetensors"))) == 2 for f in versions(asset_dir))
    warning, summary = out.err.strip().splitlines()
    assert warning.startswith(f"assets-pipeline prune: warning: {pointer}: not valid JSON, damaged or cut short")
    assert "rematerialize lora_adapter for concept 'rex'" in warning and "no version of" in warning
    assert "1 damaged record(s) skipped" in summary
    assert out.out.count("pruned  ") == 2
