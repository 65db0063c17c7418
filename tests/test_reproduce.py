"""`assets-pipeline reproduce`: an output trained again from its manifest alone, its weights compared with the
original's. Identical on the CPU; a changed or missing photo, a tampered weights file, changed code or base model,
and a manifest from before reproduction was recorded each end with the reason."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import SPEC, encode, photo, plan_for, snapshot

CONCEPT = "rex"
# A sidecar caption for one photo, the template for the others: two text embeddings. Two aspect ratios: two buckets.
PHOTOS = {"astronaut.png": encode(photo("astronaut", (96, 80)), "PNG"),
          "astronaut.txt": b"a photo of sks dog in a space suit",
          "chelsea.png": encode(photo("chelsea", (80, 96)), "PNG"),
          "coffee.png": encode(photo("coffee", (96, 80)), "PNG")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, built_models):
    """One tiny LoRA (3 steps) of a three-photo concept, trained by the trainer process as the model asset runs it:
    the dataset assets through Dagster, the job planned by training/plan.py."""
    from assets_pipeline.assets.common import spec_from_snapshot
    from assets_pipeline.resources import BaseModelResource, TrainerLauncher
    from tests.conftest import build_dataset_half

    root = tmp_path_factory.mktemp("reproduce")
    storage = build_dataset_half(root, built_models, CONCEPT, PHOTOS, SPEC)
    spec = spec_from_snapshot(storage, CONCEPT)
    ref = BaseModelResource().resolve(storage.artifact_path(), spec)
    job = plan_for(storage, ref, spec, "lora", run_id="original", trainer=TrainerLauncher(device="cpu"),
                   overrides={"max_train_steps": 3})
    job_path = Path(job.output_dir).parent / ".job-original.json"
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job.save(job_path)
    subprocess.run([sys.executable, "-m", "assets_pipeline.training", "--job", str(job_path)], check=True,
                   capture_output=True)
    job_path.unlink()
    return SimpleNamespace(root=root, output=Path(job.output_dir).relative_to(root))


@pytest.fixture
def world(trained, tmp_path, monkeypatch):
    """A copy of the trained roots for one test to change; the CLI reads them through the environment."""
    root = tmp_path / "world"
    shutil.copytree(trained.root, root)
    monkeypatch.setenv("ASSETS_PIPELINE_DATA", str(root / "data"))
    monkeypatch.setenv("ASSETS_PIPELINE_ARTIFACTS", str(root / "artifacts"))
    out = root / trained.output
    return SimpleNamespace(root=root, data=root / "data", artifacts=root / "artifacts", out=out,
                           manifest=json.loads((out / "lineage.json").read_text()))


def _store_entry(world, source_path: str) -> Path:
    """The decoded copy of a photo in the store (the image cache), as the manifest records it."""
    row = next(i for i, r in enumerate(world.manifest["training_images"]) if r["source_path"] == source_path)
    return world.artifacts / world.manifest["reproduction"]["rows"][row]["decoded"]


def _scratch_folders(world) -> list[Path]:
    return list(world.artifacts.glob(".reproduce-*"))


@pytest.mark.slow
def test_an_output_reproduces_identically_and_nothing_is_written_outside_the_scratch_folder(world, capsys):
    from assets_pipeline.cli import main

    before = snapshot(world.root)
    assert main(["reproduce", str(world.out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "identical\n"
    # The bundle re-derived from the photos holds the very tensors the output was trained on.
    assert f"concept '{CONCEPT}': the latents and text embeddings re-derived from the photos are, bit for bit, those " \
        "of the bundle the output was trained on" in captured.err
    assert "step 3/3" in captured.err  # the trainer ran
    assert snapshot(world.root) == before and not _scratch_folders(world)


@pytest.mark.slow
def test_a_changed_or_missing_photo_is_named_and_nothing_trains(world, tmp_path, capsys):
    from assets_pipeline.cli import main

    (world.data / CONCEPT / "chelsea.png").write_bytes(encode(photo("chelsea", (80, 96)), "JPEG"))
    (world.data / CONCEPT / "coffee.png").unlink()
    for name in ("chelsea.png", "coffee.png"):  # nor are their decoded copies in the store
        _store_entry(world, name).unlink()
    assert main(["reproduce", str(world.out), "--scratch", str(tmp_path / "scratch")]) == 2
    err = capsys.readouterr().err
    changed = next(line for line in err.splitlines() if f"photo {CONCEPT}/chelsea.png" in line)
    assert "changed in the data root since training" in changed and "not in the store" in changed
    missing = next(line for line in err.splitlines() if f"photo {CONCEPT}/coffee.png" in line)
    assert "missing from the data root" in missing and "not in the store" in missing
    assert "astronaut" not in err  # the intact photo is not a problem
    assert "step 1/" not in err and (tmp_path / "scratch").is_dir() and not list((tmp_path / "scratch").iterdir())


@pytest.mark.slow
def test_tampered_weights_show_the_difference_per_tensor(world, capsys):
    """One value of one tensor of the output's weights changed after training is found, with its size. Photos are
    found by their sha256: one moved in its concept folder, one changed there whose decoded copy the store has. A
    library version the manifest records differently trains with --allow-code-change, said in a note, as is the
    edit of the manifest (its sha256 is stamped into the weights)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from assets_pipeline.cli import main

    (world.data / CONCEPT / "coffee.png").write_bytes(encode(photo("coffee", (96, 80)), "JPEG"))
    (world.data / CONCEPT / "kept").mkdir()
    (world.data / CONCEPT / "astronaut.png").rename(world.data / CONCEPT / "kept" / "astro.png")
    weights = world.out / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(weights))
    name = min(tensors)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.5
    save_file(tensors, str(weights), metadata=meta)
    edited = copy.deepcopy(world.manifest)
    edited["reproduction"]["code"]["libraries"]["peft"] = "0.0.1"
    (world.out / "lineage.json").write_text(json.dumps(edited))

    assert main(["reproduce", str(world.out), "--keep", "--allow-code-change"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    total = len(tensors) + len(load_file(str(world.out / "kohya_lora.safetensors")))
    assert lines[0] == f"differs: 1 of {total} tensors (largest absolute difference per tensor)" and len(lines) == 2
    file, tensor, diff = lines[1].split()
    assert (file, tensor) == ("pytorch_lora_weights.safetensors", name) and float(diff) == pytest.approx(0.5, abs=1e-4)
    assert "pytorch_lora_weights.safetensors: the output's file no longer has the tensors its manifest records " \
        "(changed after training); the reproduction has them" \
        in captured.err
    coffee = next(line for line in captured.err.splitlines() if f"photo {CONCEPT}/coffee.png" in line)
    assert "changed in the data root" in coffee and "decoded copy came from the store" in coffee
    astronaut = next(line for line in captured.err.splitlines() if f"photo {CONCEPT}/astronaut.png" in line)
    moved = world.data / CONCEPT / "kept" / "astro.png"
    assert "missing from the data root" in astronaut and f"found by its sha256 at {moved}" in astronaut
    assert "note: code changed: peft 0.0.1 when trained" in captured.err
    assert captured.err.count("lineage.json was edited after training: the weights were stamped with its sha256") == 1
    kept = _scratch_folders(world)
    assert len(kept) == 1 and f"kept the scratch folder {kept[0]}" in captured.err
    # The reproduction itself is the untampered original.
    again = load_file(str(next(kept[0].glob("concepts/*/lora_adapter/*/pytorch_lora_weights.safetensors"))))
    assert not torch.equal(again[name], tensors[name]) and torch.equal(
        again[name].view(-1)[1:], tensors[name].view(-1)[1:])


@pytest.mark.slow
def test_changed_code_or_base_model_is_refused_before_any_work(world, capsys):
    from assets_pipeline.cli import main

    lineage = world.out / "lineage.json"
    edited = copy.deepcopy(world.manifest)
    edited["reproduction"]["code"]["source_sha256"] = "0" * 64
    edited["reproduction"]["code"]["libraries"]["torch"] = "1.0.0"
    lineage.write_text(json.dumps(edited))
    assert main(["reproduce", str(world.out)]) == 2
    err = capsys.readouterr().err
    assert "assets_pipeline's sources differ (sha256 000000000000 when trained" in err
    assert "torch 1.0.0 when trained" in err and "--allow-code-change" in err

    edited = copy.deepcopy(world.manifest)
    edited["reproduction"]["base_model"]["fingerprint"] = "f" * 64
    lineage.write_text(json.dumps(edited))
    assert main(["reproduce", str(world.out)]) == 2
    err = capsys.readouterr().err
    assert "base model 'embedded'" in err and "trained on fingerprint ffffffffffffffff" in err
    assert not _scratch_folders(world)


def test_a_manifest_from_before_reproduction_says_what_it_lacks(tmp_path, monkeypatch, capsys):
    """So does a damaged one, and a folder that is no output."""
    from assets_pipeline.cli import main

    out = tmp_path / "artifacts" / "concepts" / CONCEPT / "lora_adapter" / "20260101T000000Z-run"
    out.mkdir(parents=True)
    (out / "lineage.json").write_text(json.dumps({
        "concept": CONCEPT, "method": "lora", "method_config": {}, "job_identity": "x", "weights": {},
        "training_images": [{"image_sha256": "ab" * 32, "role": "instance", "caption": "c", "source_path": "a.png"}]}))
    monkeypatch.setenv("ASSETS_PIPELINE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("ASSETS_PIPELINE_ARTIFACTS", str(tmp_path / "artifacts"))
    assert main(["reproduce", str(out)]) == 2
    err = capsys.readouterr().err
    for part in ("preprocessing", "reproduction.base_model", "reproduction.job", "reproduction.rows",
                 "reproduction.code"):
        assert part in err
    assert "concept (" not in err and "train the output again" in err
    (out / "lineage.json").write_text('{"concept": "rex", "meth')  # cut short
    assert main(["reproduce", str(out)]) == 2
    assert "lineage.json: not valid JSON, damaged or cut short" in capsys.readouterr().err
    assert main(["reproduce", str(tmp_path / "nothing")]) == 2
    assert "not a trained output" in capsys.readouterr().err
    assert not list((tmp_path / "artifacts").glob(".reproduce-*"))
