"""Training recipes (TrainConfig): noise offset, input perturbation, caption dropout, caption shuffling, EMA and the
optimizers, on tiny tensors, a synthetic TrainingData and the embedded model's U-Net."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from assets_pipeline.training.config import TrainConfig
from assets_pipeline.training.data import TrainingData, seeded_generator, shuffle_tags
from assets_pipeline.training.methods import get_method
from assets_pipeline.models.families import get_family
from assets_pipeline.training.methods.base import Batch, Method, Models, TrainingInputError
from assets_pipeline.training.step import per_sample_mse
from helpers import write_synthetic_bundle

# -- noise offset and input perturbation ------------------------------------------------------------------------


class RecordingScheduler:
    """DDPM's interface, recording the noise the latents are noised with (``add_noise`` is latents + noise)."""

    config = SimpleNamespace(prediction_type="epsilon", num_train_timesteps=1000)

    def add_noise(self, latents, noise, timesteps):
        self.noise_in = noise
        return latents + noise


class ZeroPrediction(Method):
    def predict(self, models, noisy_latents, timesteps, prompt_embeds, batch):
        return torch.zeros_like(noisy_latents)


def noise_of(cfg: TrainConfig, seed: int = 0, monkeypatch=None):
    """(noise the latents were noised with, target) of one compute_loss step."""
    from assets_pipeline.training import step

    seen = {}

    def mse(pred, target):
        seen["target"] = target
        return per_sample_mse(pred, target)

    monkeypatch.setattr(step, "per_sample_mse", mse)
    scheduler = RecordingScheduler()
    batch = Batch(latents=torch.ones(2, 4, 6, 6), prompt_embeds=torch.zeros(2, 77, 8), is_class=torch.tensor([0, 0]))
    step.compute_loss(ZeroPrediction(), Models(family=get_family("sd1"), denoiser=None, noise_scheduler=scheduler),
                      [batch], cfg, torch.Generator().manual_seed(seed), torch.float32)
    return scheduler.noise_in, seen["target"]


def test_noise_offset_adds_a_per_channel_constant_deterministically(monkeypatch):
    plain, _ = noise_of(TrainConfig(), monkeypatch=monkeypatch)
    offset, target = noise_of(TrainConfig(noise_offset=0.1), monkeypatch=monkeypatch)
    shift = offset - plain  # the first draw is the plain noise; the offset is drawn after it
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over h, w
    assert shift[:, :, 0, 0].abs().min() > 0 and shift[:, :, 0, 0].unique().numel() == 8  # per sample and channel
    assert torch.equal(target, offset)  # the model learns to predict the offset noise (diffusers' script)
    again, _ = noise_of(TrainConfig(noise_offset=0.1), monkeypatch=monkeypatch)
    assert torch.equal(again, offset)
    assert not torch.equal(noise_of(TrainConfig(noise_offset=0.1), seed=1, monkeypatch=monkeypatch)[0], offset)


def test_input_perturbation_changes_the_noisy_latents_not_the_target(monkeypatch):
    plain_in, plain_target = noise_of(TrainConfig(), monkeypatch=monkeypatch)
    noise_in, target = noise_of(TrainConfig(input_perturbation=0.1), monkeypatch=monkeypatch)
    assert torch.equal(target, plain_target) and torch.equal(plain_in, plain_target)
    extra = noise_in - target
    assert extra.abs().min() > 0 and 0.05 < extra.std().item() < 0.15


def reference_compute_loss(method, models, parts, cfg, generator, weight_dtype):
    """compute_loss as it was before the recipes (the loop's default step must stay exactly this)."""
    from diffusers.training_utils import compute_snr

    def snr_weights(noise_scheduler, timesteps, gamma):  # Min-SNR-gamma as it was written then
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        if noise_scheduler.config.prediction_type == "v_prediction":
            return weights / (snr + 1)
        return weights / snr

    scheduler = models.noise_scheduler
    v_pred = scheduler.config.prediction_type == "v_prediction"
    losses, is_class = [], []
    for batch in parts:
        latents = batch.latents.to(weight_dtype)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                                  device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
        embeds = method.encode(models, batch).to(weight_dtype)
        row_losses = per_sample_mse(method.predict(models, noisy, timesteps, embeds, batch), target)
        if cfg.snr_gamma:
            row_losses = row_losses * snr_weights(scheduler, timesteps, cfg.snr_gamma)
        losses.append(row_losses)
        is_class.append(batch.is_class)
    return method.loss(torch.cat(losses), torch.cat(is_class), cfg)


@pytest.fixture(scope="module")
def unet_models(embedded_model_dir):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    return Models(family=get_family("sd1"),
                  denoiser=UNet2DConditionModel.from_pretrained(embedded_model_dir, subfolder="unet"),
                  noise_scheduler=DDPMScheduler.from_pretrained(embedded_model_dir, subfolder="scheduler"))


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_default_recipes_leave_the_step_exactly_as_before(unet_models, snr_gamma):
    from assets_pipeline.training.step import compute_loss

    method = get_method("dreambooth")
    cfg = method.config_cls(with_prior_preservation=False, snr_gamma=snr_gamma)
    torch.manual_seed(0)
    batch = dict(latents=torch.randn(2, 4, 16, 16), prompt_embeds=torch.randn(2, 77, 32),
                 is_class=torch.tensor([False, False]))
    with torch.no_grad():
        got = compute_loss(method, unet_models, [Batch(**batch)], cfg, torch.Generator().manual_seed(7), torch.float32)
        want = reference_compute_loss(method, unet_models, [Batch(**batch)], cfg, torch.Generator().manual_seed(7),
                                      torch.float32)
    assert torch.equal(got, want)


# -- caption dropout and shuffling ------------------------------------------------------------------------------

CAPTIONS = ["sks, dog, grass, sunny", "sks, dog, beach", "sks, cat, sofa, lamp, night", "sks"]


def synthetic(empty: bool = True) -> TrainingData:
    """Four rows in one 32x32 bucket; row i's embedding is all i, the empty caption's all -1."""
    n = len(CAPTIONS)
    mean = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(-1, 4, 4, 4).clone()
    embeds = torch.arange(n, dtype=torch.float32)[:, None, None].expand(-1, 77, 8).clone()
    return TrainingData([(32, 32)], [mean], [torch.zeros_like(mean)], [0] * n, embeds, ["instance"] * n,
                        list(CAPTIONS), empty_embeds=torch.full((1, 77, 8), -1.0) if empty else None)


def dropped(data: TrainingData, seed: int, rate: float) -> list[bool]:
    (part,) = data.draw([0, 1, 2, 3], torch.Generator().manual_seed(seed), 1.0, False, caption_dropout=rate)
    return (part.prompt_embeds[:, 0, 0] == -1).tolist()


def test_caption_dropout_uses_the_empty_embedding_for_a_seeded_share_of_rows():
    data = synthetic()
    masks = [dropped(data, seed, 0.25) for seed in range(200)]
    share = sum(map(sum, masks)) / (4 * len(masks))
    assert 0.2 < share < 0.3
    assert masks == [dropped(data, seed, 0.25) for seed in range(200)]  # a pure function of the generator
    (part,) = data.draw([0, 1, 2, 3], torch.Generator().manual_seed(3), 1.0, False, caption_dropout=0.5)
    kept = part.prompt_embeds[:, 0, 0]
    assert set(kept.tolist()) <= {-1.0, 0.0, 1.0, 2.0, 3.0} and (kept == -1).any() and (kept != -1).any()
    for row, value in enumerate(kept.tolist()):
        assert value in (-1.0, float(row))
    # The latents are drawn before the dropout: the same as without it.
    (plain,) = data.draw([0, 1, 2, 3], torch.Generator().manual_seed(3), 1.0, False)
    assert torch.equal(plain.latents, part.latents) and torch.equal(plain.prompt_embeds, data.embeds)


def test_caption_dropout_without_the_empty_embedding_names_the_fix():
    with pytest.raises(TrainingInputError, match="caption_dropout = 0.1 .*rematerialize vae_latents"):
        synthetic(empty=False).check_caption_dropout(0.1)
    synthetic(empty=False).check_caption_dropout(0.0)  # old bundles still train without it


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(embedded_model_dir, subfolder="tokenizer")


def test_caption_dropout_with_the_text_encoder_tokenizes_the_empty_caption(tokenizer):
    data = synthetic(empty=False)
    data.tokenize([tokenizer])
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]
    (part,) = data.draw([0, 1, 2, 3], torch.Generator().manual_seed(3), 1.0, False, caption_dropout=0.5)
    drop = [torch.equal(ids, empty) for ids in part.token_ids[0]]
    assert any(drop) and not all(drop)
    for row, ids in enumerate(part.token_ids[0]):
        assert drop[row] or torch.equal(ids, data.token_ids[0][row])


def test_shuffle_keeps_the_first_tags_and_permutes_the_rest_per_seed_and_step():
    caption = "sks, dog, grass, sunny, smiling, outdoors"
    tags = [t.strip() for t in caption.split(",")]
    out = [shuffle_tags(caption, 2, seeded_generator("shuffle", 0, step)) for step in range(8)]
    for s in out:
        got = s.split(", ")
        assert got[:2] == tags[:2] and sorted(got[2:]) == sorted(tags[2:])
    assert len(set(out)) > 1  # other steps, other orders
    assert out == [shuffle_tags(caption, 2, seeded_generator("shuffle", 0, step)) for step in range(8)]
    assert shuffle_tags("sks", 1, seeded_generator("shuffle", 0, 0)) == "sks"
    assert shuffle_tags(caption, 6, seeded_generator("shuffle", 0, 0)) == ", ".join(tags)


def test_shuffled_captions_are_tokenized_per_step_and_the_text_encoder_is_loaded(tokenizer):
    data = synthetic()
    data.tokenize([tokenizer])
    ids = data.shuffled_ids([2, 0], 1, seeded_generator("shuffle", 0, 5))
    g = seeded_generator("shuffle", 0, 5)
    expected = [shuffle_tags(CAPTIONS[r], 1, g) for r in (2, 0)]
    want = tokenizer(expected, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    assert torch.equal(ids[0], want.input_ids)
    (part,) = data.draw([2, 0], torch.Generator().manual_seed(0), 1.0, False, token_ids=ids)
    assert torch.equal(part.token_ids[0], ids[0])
    for name in ("dreambooth", "controlnet", "lora"):
        method = get_method(name)
        assert not method.runs_text_encoder(method.config_cls())
        assert method.runs_text_encoder(method.config_cls(shuffle_caption=True))


# -- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("optimizer", "sgd"), ("caption_dropout", 1.5), ("noise_offset", -0.1),
                                        ("ema_decay", 1.0), ("keep_tokens", -1)])
def test_invalid_recipe_values_name_the_key_and_value(key, value):
    with pytest.raises(ValueError, match=rf"{key} = {value!r}"):
        TrainConfig(**{key: value})
    from assets_pipeline.concept import ConceptSpecError
    from assets_pipeline.partitions.concept_spec import check_section

    with pytest.raises(ConceptSpecError, match=rf"\[lora\].*{key} = {value!r}"):
        check_section("lora", {key: value}, "c/concept.toml [lora]")


def test_recipes_are_in_every_methods_config_and_the_job_identity():
    for name in ("lora", "dreambooth", "textual_inversion", "controlnet"):
        fields = asdict(get_method(name).config_cls())
        assert {"noise_offset", "input_perturbation", "caption_dropout", "shuffle_caption", "keep_tokens", "use_ema",
                "ema_decay", "optimizer", "prodigy_beta3"} <= set(fields)
    from helpers import make_job

    def job(**cfg):
        return make_job("lora", cfg)

    assert len({job().identity(), job(use_ema=True).identity(), job(noise_offset=0.05).identity(),
                job(optimizer="prodigy").identity()}) == 4


# -- optimizers -------------------------------------------------------------------------------------------------


def regression(cfg: TrainConfig, steps: int = 20):
    from assets_pipeline.training.optimizers import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    start = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(cfg, list(model.parameters()), fused=False)
    x = torch.randn(32, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    losses = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, start, losses, opt


def test_prodigy_trains_and_warns_about_a_low_learning_rate(caplog):
    model, start, losses, opt = regression(TrainConfig(optimizer="prodigy", learning_rate=1.0))
    assert type(opt).__name__ == "Prodigy" and opt.param_groups[0]["use_bias_correction"]
    assert all(map(lambda v: v == v and abs(v) < float("inf"), losses)) and losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
    assert "too low for Prodigy" not in caplog.text
    regression(TrainConfig(optimizer="prodigy", learning_rate=1e-4), steps=1)
    assert "too low for Prodigy" in caplog.text


def test_default_adamw_steps_as_torch_adamw():
    model, _, _, opt = regression(TrainConfig(), steps=5)
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=1e-2)
    x = torch.randn(32, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    for _ in range(5):
        ((ref(x) - y) ** 2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_8bit_adamw_on_the_cpu_is_refused_before_any_model_is_loaded(monkeypatch, tmp_path):
    from assets_pipeline.training import loop
    from assets_pipeline.training.optimizers import check_optimizer
    from helpers import make_job

    with pytest.raises(TrainingInputError, match=r'\[lora\] optimizer = "adamw_8bit" needs a CUDA GPU'):
        check_optimizer(TrainConfig(optimizer="adamw_8bit"), cuda=False, section="lora")
    check_optimizer(TrainConfig(), cuda=False, section="lora")

    def no_models(*args):
        raise AssertionError("models were loaded before the optimizer check")

    monkeypatch.setattr(loop.Models, "load", no_models)
    job = make_job("lora", {"optimizer": "adamw_8bit"}, checkpoint_dir=str(tmp_path), device="cpu",
                   rows=[{"image_sha256": f"{i}", "role": "instance", "caption": "c"} for i in range(3)])
    with pytest.raises(TrainingInputError, match="adamw_8bit"):
        loop.train(job)


# -- EMA through the loop ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ema_job(built_models, tmp_path_factory):
    """A DreamBooth job (no prior preservation) on a synthetic 3-photo latents bundle of the embedded model."""
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.training.job import TrainingRow, TrainJob

    root = tmp_path_factory.mktemp("ema")
    write_synthetic_bundle(root)
    ref = resolve_base_model("embedded", built_models)

    def job(checkpoint_dir: str, **cfg) -> TrainJob:
        config = get_method("dreambooth").config_cls(**{
            "with_prior_preservation": False, "max_train_steps": 4, "checkpointing_steps": 2, "learning_rate": 1e-3,
            **cfg})
        return TrainJob(concept="c", method="dreambooth", config=config, base_model=ref,
                        latents_dir=str(root), output_dir=str(root / "out"), checkpoint_dir=checkpoint_dir,
                        token="sks", class_noun="dog", lineage={}, device="cpu", mixed_precision="no",
                        training_images=tuple(TrainingRow(s, "instance", "sks, dog, grass, sunny", None, None, "", "")
                                              for s in "abc"))

    return root, job


def test_ema_weights_are_the_output_and_resume_exactly(ema_job, monkeypatch):
    import diffusers.training_utils

    from assets_pipeline.training.checkpoints import checkpoint_root
    from assets_pipeline.training.loop import train

    made = []

    class SpyEMA(diffusers.training_utils.EMAModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def copy_to(self, parameters):
            parameters = list(parameters)
            self.raw = [p.detach().clone() for p in parameters]  # the trained weights the average replaces
            super().copy_to(parameters)

    monkeypatch.setattr(diffusers.training_utils, "EMAModel", SpyEMA)
    root, job = ema_job
    averaged_job = job(str(root / "a"), use_ema=True, ema_decay=0.5)
    averaged = train(averaged_job)
    weights = list(averaged.models.denoiser.parameters())
    assert made[-1].optimization_step == 4
    assert all(torch.equal(w, s) for w, s in zip(weights, made[-1].shadow_params))  # the output is the average
    assert any(not torch.equal(w, r) for w, r in zip(weights, made[-1].raw))  # not the raw weights
    # The saved output holds the average, and stock diffusers loads it (a DreamBooth pipeline folder).
    from diffusers import StableDiffusionPipeline

    from assets_pipeline.models.load import base_pipeline_loader

    out = root / "ema_output"
    out.mkdir()
    averaged.method.save(averaged.models, base_pipeline_loader(averaged_job.base_model), out, averaged.cfg,
                         averaged.ctx)
    loaded = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True).unet
    assert all(torch.equal(a, s) for a, s in zip(loaded.parameters(), made[-1].shadow_params))

    # The step-2 checkpoint (EMA state included) in a fresh folder: the rerun resumes there and ends the same.
    resumed_job = job(str(root / "b"), use_ema=True, ema_decay=0.5)
    shutil.copytree(checkpoint_root(averaged_job) / "step-2", checkpoint_root(resumed_job) / "step-2")
    resumed = train(resumed_job)
    assert resumed.resumed_from == 2 and resumed.losses == averaged.losses
    assert all(torch.equal(a, b) for a, b in zip(weights, resumed.models.denoiser.parameters()))


def test_the_latents_bundle_holds_the_empty_captions_embedding(encoders, tmp_path):
    import pandas as pd

    from assets_pipeline.stages.bundle import write_latent_bundle
    from assets_pipeline.stages.latents import LatentConfig, compute_latents, encode_text_entries
    from assets_pipeline.store import ItemCache
    from assets_pipeline.training.job import TrainingRow
    from helpers import photo

    rows = []
    for i, name in enumerate(["astronaut", "coffee", "rocket"]):
        photo(name, (64, 64)).save(tmp_path / f"{name}.png")
        rows.append({"image_sha256": f"{i:02d}" * 32, "decoded_path": str(tmp_path / f"{name}.png"),
                     "caption": f"a photo of sks {name}", "role": "instance"})
    lat, txt = ItemCache(tmp_path, "latents", ".safetensors"), ItemCache(tmp_path, "text_embeds", ".safetensors")
    index = compute_latents(pd.DataFrame(rows), encoders, 64, LatentConfig(), lat, txt)
    write_latent_bundle(index, lat, txt, tmp_path / "latents.safetensors", {}, encoders.family)
    data = TrainingData.from_bundle(
        tmp_path, [TrainingRow(r["image_sha256"], r["role"], r["caption"], None, None, "", "") for r in rows],
        lambda c: c, control=False)
    assert torch.allclose(data.empty_embeds, encode_text_entries([""], encoders)[0]["prompt_embeds"][None], atol=1e-5)
    data.check_caption_dropout(0.1)


def test_every_recipe_at_once_trains_through_the_loop_with_a_frozen_text_encoder(ema_job, caplog):
    """Shuffled captions load the text encoder (frozen: DreamBooth trains the U-Net only) and encode every step;
    with caption dropout (the empty caption's token ids), noise offset, input perturbation and Prodigy."""
    from assets_pipeline.training.loop import train

    root, job = ema_job
    state = train(job(str(root / "all"), max_train_steps=2, shuffle_caption=True, keep_tokens=1, caption_dropout=0.5,
                      noise_offset=0.1, input_perturbation=0.1, optimizer="prodigy", learning_rate=1.0))
    assert len(state.losses) == 2 and all(0 < v < float("inf") for v in state.losses)
    (text_encoder,) = state.models.text_encoders
    assert text_encoder is not None
    assert not any(p.requires_grad for p in text_encoder.parameters())
    assert state.stats["optimizer"] == "prodigy" and "too low for Prodigy" not in caplog.text
