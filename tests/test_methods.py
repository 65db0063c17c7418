"""training/methods/: the contract every fine-tuning method keeps, as one table over the four methods, and each
method's own rules. The contract runs each method through the real loop (``loop.train``) and ``write_output`` on a
synthetic latents bundle of the embedded SD 1.x model (no dataset build, no Dagster): it trains what it says, saves
the files it says, lists its rows in the manifest, and its output loads back in stock diffusers and changes the
image. ``test_training.py`` runs the same methods end to end through Dagster (slow lane)."""

from __future__ import annotations

import json

import pytest

from assets_pipeline.training.config import TrainConfig
from assets_pipeline.training.methods import get_method, method_names
from assets_pipeline.training.methods.base import TrainContext, TrainingInputError
from helpers import METHODS


def ctx(**kw):
    base = dict(concept="c", token="sks", class_noun="dog", resolution=64, num_instance_images=5,
                num_class_images=8, num_control_images=5)
    return TrainContext(**{**base, **kw})


def test_the_table_covers_every_registered_method_and_the_registry_fails_loudly():
    assert method_names() == sorted(METHODS) == ["controlnet", "dreambooth", "lora", "textual_inversion"]
    with pytest.raises(KeyError, match="registered"):
        get_method("hypernetwork")


@pytest.mark.parametrize("name", list(METHODS))
def test_each_methods_defaults_follow_diffusers_examples(name):
    method, contract = get_method(name), METHODS[name]
    cfg = method.config_cls()
    assert (method.asset_name, cfg.learning_rate) == (contract.asset, contract.learning_rate)
    assert method.batch_roles(cfg) == contract.roles
    assert method.runs_text_encoder(cfg) is contract.runs_text_encoder
    if name == "lora":
        assert cfg.rank == 4
    if name == "dreambooth":
        assert (cfg.prior_loss_weight, cfg.num_class_images) == (1.0, 100)


@pytest.mark.parametrize("name", list(METHODS))
def test_fewer_than_three_images_is_refused_with_what_to_fix(name):
    m = get_method(name)
    with pytest.raises(TrainingInputError, match="at least 3 photos"):
        m.check_inputs(ctx(num_instance_images=2), m.config_cls())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, built_models):
    """A latents bundle of the embedded model: three instance photos (each with a decoded image and a
    conditioning image) and three class images, random latents and text embeddings."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.store import record_digest
    from conftest import link_models

    root = tmp_path_factory.mktemp("methods")
    artifacts = link_models(built_models, root / "artifacts")
    g = torch.Generator().manual_seed(0)
    shas, roles = ["a", "b", "c", "x", "y", "z"], ["instance"] * 3 + ["class"] * 3
    save_file({"prompt_embeds": torch.randn(6, 77, 32, generator=g),
               "latent_mean@64x64": torch.randn(6, 4, 32, 32, generator=g),
               "latent_std@64x64": torch.full((6, 4, 32, 32), 0.1)}, str(root / "latents.safetensors"),
              metadata={"image_sha256": json.dumps(shas), "role": json.dumps(roles),
                        "bucket": json.dumps(["64x64"] * 6)})
    record_digest(root / "latents.safetensors")
    rows = []
    for i, (sha, role) in enumerate(zip(shas, roles)):
        photo, control = root / f"{sha}.png", root / f"{sha}-control.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
        Image.fromarray(np.random.default_rng(10 + i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(control)
        rows.append({"image_sha256": sha, "role": role, "caption": "a photo of sks dog" if role == "instance" else
                     "a photo of a dog", "source_path": str(photo), "decoded_path": str(photo),
                     "control_path": str(control) if role == "instance" else None})
    return root, artifacts, resolve_base_model("embedded", artifacts), rows


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_what_it_says_and_its_output_loads_in_stock_diffusers(bundle, name, monkeypatch):
    """Two optimizer steps through the loop and write_output: what trains, the files, the manifest's rows,
    finite weights and a rendered image that differs from the base model's."""
    from assets_pipeline.training import loop
    from assets_pipeline.training.output import write_output
    from assets_pipeline.training.verify import nonfinite_tensors
    from helpers import make_job

    root, artifacts, ref, rows = bundle
    contract = METHODS[name]
    prepared = []
    real_prepare = get_method(name).prepare
    monkeypatch.setattr(get_method(name), "prepare", lambda *a: prepared.append(real_prepare(*a)) or prepared[-1])
    config = {"max_train_steps": 2, "learning_rate": 1e-2, **({"num_class_images": 3} if name == "dreambooth" else {})}
    job = make_job(name, config, rows=[r for r in rows if r["role"] in contract.roles], base_model=ref,
                   latents_dir=str(root), output_dir=str(root / name / "out"),
                   checkpoint_dir=str(root / name / "checkpoints"), device="cpu", mixed_precision="no",
                   validation_inference_steps=2, validation_seeds=(0,), cache_dir=str(root / "cache"),
                   scorer={"model_name": "embedded", "artifact_root": str(artifacts)})
    state = loop.train(job)
    assert prepared == [list(contract.trains)]
    assert len(state.losses) == 2 and all(loss == loss for loss in state.losses)
    result = write_output(job, state, "cpu")
    out = root / name / "out"
    manifest = json.loads((out / "lineage.json").read_text())
    assert set(manifest["weights"]) == contract.weights
    assert {r["role"] for r in manifest["training_images"]} == set(contract.roles)
    assert manifest["job_identity"] == job.identity() and manifest["method"] == name
    assert not any(nonfinite_tensors(out).values())
    assert result["mean_abs_change_vs_base"] > 0, "the trained output leaves the image unchanged"
    for name_ in ("metrics.json", "SHA256SUMS", "loss.csv", "validation/grid.png"):
        assert (out / name_).is_file(), name_


def test_dreambooth_refuses_without_class_noun_or_class_images():
    m = get_method("dreambooth")
    with pytest.raises(TrainingInputError, match="class noun"):
        m.check_inputs(ctx(class_noun=""), m.config_cls())
    with pytest.raises(TrainingInputError, match="no class images"):
        m.check_inputs(ctx(num_class_images=0), m.config_cls())
    m.check_inputs(ctx(num_class_images=0), m.config_cls(with_prior_preservation=False))  # allowed


def test_controlnet_refuses_without_control_images():
    m = get_method("controlnet")
    with pytest.raises(TrainingInputError, match="control_images"):
        m.check_inputs(ctx(num_control_images=0), m.config_cls())


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="rank"):
        get_method("lora").config_cls(rank=0)
    with pytest.raises(ValueError, match="learning_rate"):
        get_method("controlnet").config_cls(learning_rate=0)


def test_steps_scale_with_dataset_size_within_bounds():
    cfg = TrainConfig()
    assert cfg.total_steps(1) == cfg.min_train_steps
    assert cfg.total_steps(5) == 500 and cfg.total_steps(10) == 1000
    assert cfg.total_steps(1000) == cfg.max_scaled_steps
    assert TrainConfig(max_train_steps=7).total_steps(1000) == 7


def test_textual_inversion_caption_uses_the_placeholder():
    m = get_method("textual_inversion")
    assert m.training_caption("a photo of sks dog on grass", ctx()) == "a photo of <sks> dog on grass"
    assert m.training_caption("a dog on grass", ctx()) == "a photo of <sks>, a dog on grass"
    assert m.training_caption("asksme sks", ctx()) == "asksme <sks>"


def test_dreambooth_loss_adds_weighted_prior_half():
    import torch

    m = get_method("dreambooth")
    losses = torch.tensor([1.0, 4.0, 3.0])  # per-row MSE: instance 1, class 4, instance 3
    is_class = torch.tensor([False, True, False])
    assert m.loss(losses, is_class, m.config_cls(prior_loss_weight=0.5)).item() == pytest.approx(2.0 + 0.5 * 4.0)
    assert m.loss(losses, is_class, m.config_cls(with_prior_preservation=False)).item() == pytest.approx(8 / 3)
