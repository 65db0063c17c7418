"""A damaged checkpoint (issue 28, point 5: a truncated ``step-N/model.safetensors`` failed every rerun with
``SafetensorError: incomplete metadata`` until deleted by hand): resuming checks each checkpoint's files against
the sizes it recorded and each safetensors file against its header, skips a damaged one with a warning naming it
and why, and resumes from the one before, ending where an uninterrupted run ends."""

from __future__ import annotations

import json

import torch

from helpers import make_job, write_synthetic_bundle


def _job(tmp_path, ref, name):
    return make_job("lora", {"max_train_steps": 6, "checkpointing_steps": 2, "learning_rate": 1e-3},
                    rows=[{"image_sha256": s, "role": "instance", "caption": "a photo of sks dog"} for s in "abc"],
                    base_model=ref, latents_dir=str(tmp_path), output_dir=str(tmp_path / name / "out"),
                    checkpoint_dir=str(tmp_path / name / "ckpt"), device="cpu", mixed_precision="no")


def _lora(state):
    return {k: v.detach().clone() for k, v in state.models.denoiser.state_dict().items() if "lora" in k}


def test_a_truncated_checkpoint_is_skipped_for_the_one_before_and_the_run_ends_the_same(tmp_path,
                                                                                      embedded_model_dir):
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.training import loop
    from assets_pipeline.training.checkpoints import FILES, checkpoint_damage, checkpoint_root, checkpoints

    write_synthetic_bundle(tmp_path)
    ref = resolve_base_model("embedded", embedded_model_dir.parents[1])
    job = _job(tmp_path, ref, "run")
    first = loop.train(job, progress=lambda m: None)  # keeps step-2 and step-4 (the trainer CLI removes them)
    root = checkpoint_root(job)
    assert [s for s, _ in checkpoints(root)] == [4, 2]
    step4 = root / "step-4"
    assert json.loads((step4 / FILES).read_text())["model.safetensors"] == (step4 / "model.safetensors").stat().st_size
    assert checkpoint_damage(step4) is None

    weights = step4 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a full disk's or an interrupted copy's end
    why = checkpoint_damage(step4)
    assert why.startswith("model.safetensors has") and "were written" in why

    logged = []
    again = loop.train(job, progress=logged.append)
    warning = next(m for m in logged if m.startswith("WARNING: skipping damaged checkpoint"))
    assert str(step4) in warning and "model.safetensors has" in warning
    assert any(m.startswith("resumed from checkpoint at step 2") for m in logged)
    assert again.losses == first.losses  # steps 3-6 again, as the uninterrupted run trained them
    a, b = _lora(first), _lora(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint_damage(root / "step-4") is None  # step 4 saved again, whole


def test_a_checkpoint_from_before_the_file_list_is_checked_by_its_headers(tmp_path):
    from safetensors.torch import save_file

    from assets_pipeline.training.checkpoints import checkpoint_damage, safetensors_damage

    old = tmp_path / "step-2"
    old.mkdir()
    save_file({"w": torch.ones(4, 4)}, str(old / "model.safetensors"))
    (old / "losses.json").write_text("[0.5, 0.4]")
    assert checkpoint_damage(old) is None
    data = (old / "model.safetensors").read_bytes()
    (old / "model.safetensors").write_bytes(data[:-8])
    assert "bytes where its header describes" in safetensors_damage(old / "model.safetensors")
    (old / "model.safetensors").write_bytes(data[:5])
    assert "shorter than its" in checkpoint_damage(old) or "unreadable header" in checkpoint_damage(old)
    (old / "model.safetensors").write_bytes(data)
    (old / "losses.json").write_text("[0.5, ")
    assert checkpoint_damage(old).startswith("losses.json unreadable")
