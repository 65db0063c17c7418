"""LoRA's PEFT variants (``[lora] variant``: lora, dora, loha, lokr) with LoCon convs and text-encoder adapters:
a few steps of the loop's own training step on the embedded tiny SD 1.x, saved, and loaded back the way each
variant's users load it (stock diffusers for lora/dora; PEFT from the LyCORIS file for loha/lokr)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from assets_pipeline.training.lycoris import PREFIXES_SD, kohya_to_peft, peft_to_kohya
from assets_pipeline.training.methods import get_method
from assets_pipeline.training.methods.base import Batch, TrainContext
from assets_pipeline.models.families import get_family
from assets_pipeline.training.methods.lora import DIFFUSERS_FILE, KOHYA_FILE, PEFT_CONFIG_FILE, LoraConfig, peft_config

UNET = get_family("sd1").denoiser

PROMPT = "a photo of sks dog"
# variant -> (files written, tensor names every adapted module has in the kohya/LyCORIS file)
VARIANTS = {
    "lora": ({DIFFUSERS_FILE, KOHYA_FILE}, ("lora_down.weight", "lora_up.weight", "alpha")),
    "dora": ({DIFFUSERS_FILE}, ()),
    "loha": ({KOHYA_FILE, PEFT_CONFIG_FILE}, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")),
    "lokr": ({KOHYA_FILE, PEFT_CONFIG_FILE}, ("lokr_w1", "alpha")),
}


@pytest.fixture(scope="module")
def base(built_models):
    from assets_pipeline.models.resolve import resolve_base_model

    return resolve_base_model("embedded", built_models)


@pytest.fixture(scope="module")
def base_image(base):
    from diffusers import StableDiffusionPipeline

    return _render(StableDiffusionPipeline.from_pretrained(base.location, local_files_only=True))


def _render(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=1, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def _train(base, out: Path, cfg: LoraConfig):
    """``cfg``'s adapters on the base model after 3 AdamW steps of ``loop.compute_loss``, saved to ``out``."""
    from assets_pipeline.training.step import compute_loss
    from assets_pipeline.models.load import base_pipeline_loader
    from assets_pipeline.training.methods.base import Models

    method = get_method("lora")
    ctx = TrainContext(concept="dog", token="sks", class_noun="dog", resolution=64, num_instance_images=3,
                       family=base.family)
    torch.manual_seed(0)
    models = Models.load(base, method.needs_text_encoder(cfg))
    trainable = method.prepare(models, cfg, ctx)
    params = [p for n in trainable for p in models.network(n).parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = [tok([PROMPT] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tok in models.tokenizers]
    dim = models.denoiser.config.cross_attention_dim
    sdxl = {"pooled_embeds": torch.zeros(2, 32), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)} \
        if models.family.micro_conditioning else {}
    for step in range(3):
        batch = Batch(latents=torch.randn(2, 4, 8, 8), prompt_embeds=torch.zeros(2, 77, dim),
                      is_class=torch.zeros(2, dtype=torch.bool), token_ids=tuple(ids), **sdxl)
        loss = compute_loss(method, models, [batch], cfg, torch.Generator().manual_seed(step), torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out.mkdir()
    weights = method.save(models, base_pipeline_loader(base), out, cfg, ctx)
    return method, models, ctx, weights, ids


def _outputs(unet, encoders, ids, text_time: bool):
    """The U-Net's prediction and each text encoder's hidden states on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kw = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}} if text_time else {}
    with torch.no_grad():
        return [unet(x, 10, cond, **kw).sample] + [enc(i[:1])[0] for enc, i in zip(encoders, ids)]


def _encoders(holder):
    """The text encoders of a pipeline or of the loop's Models."""
    if hasattr(holder, "text_encoders"):
        return list(holder.text_encoders)
    return [e for e in (holder.text_encoder, getattr(holder, "text_encoder_2", None)) if e is not None]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_saves_and_loads_back_as_trained(variant, base, base_image, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from assets_pipeline.models.load import base_pipeline_loader

    files, tensors = VARIANTS[variant]
    cfg = LoraConfig(variant=variant, train_text_encoder=True, conv_rank=2, conv_alpha=1.0)
    out = tmp_path / "out"
    method, models, ctx, weights, ids = _train(base, out, cfg)
    assert {p.name for p in out.iterdir()} == files and {p.name for p in weights} <= files
    trained = _outputs(models.denoiser, _encoders(models), ids, text_time=False)

    if variant in ("lora", "dora"):  # what a diffusers user does: nothing from this project
        pipe = StableDiffusionPipeline.from_pretrained(base.location, local_files_only=True)
        pipe.load_lora_weights(str(out))
    else:
        pipe = method.load_pipeline(base_pipeline_loader(base), out, ctx)
    loaded = _outputs(pipe.unet, _encoders(pipe), ids, text_time=False)
    for name, a, b in zip(("unet", "text_encoder"), trained, loaded):
        if variant in ("loha", "lokr"):  # the same tensors through PEFT: bit for bit
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert np.abs(_render(pipe) - base_image).max() > 0, "the adapter leaves the image unchanged"

    if KOHYA_FILE not in files:
        return
    kohya = load_file(str(out / KOHYA_FILE))
    modules = {k.split(".")[0] for k in kohya}
    assert any(m.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") for m in modules)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in modules  # LoCon
    assert float(kohya["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.0  # conv_alpha, not rank
    down = {"lora": "lora_down.weight", "loha": "hada_w1_b", "lokr": "lokr_w2_b"}[variant]
    assert kohya[f"lora_unet_down_blocks_0_resnets_0_conv1.{down}"].shape[0] == cfg.conv_rank  # not rank
    assert any(m.startswith("lora_te") for m in modules)
    for m in modules:
        present = {k.split(".", 1)[1] for k in kohya if k.split(".")[0] == m}
        assert set(tensors) <= present or variant == "lokr" and {"lokr_w2_a", "lokr_w2_b"} & present, (m, present)
    if variant in ("loha", "lokr"):
        # ComfyUI's text-encoder keys (comfy/lora.py model_lora_keys_clip) on SD 1.x
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
        assert not any(k.endswith(("lora_down.weight", "lora_A.weight")) for k in kohya)
    else:  # stock diffusers reads the kohya file too, and it holds the same LoRA
        pipe = StableDiffusionPipeline.from_pretrained(base.location, local_files_only=True)
        pipe.load_lora_weights(str(out), weight_name=KOHYA_FILE)
        for name, a, b in zip(("unet", "text_encoder"), trained, _outputs(pipe.unet, _encoders(pipe), ids, False)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_the_default_variant_is_the_lora_this_method_always_trained():
    from peft import LoraConfig as PeftLoraConfig

    old = PeftLoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, init_lora_weights="gaussian",
                         target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    assert LoraConfig().variant == "lora"
    assert peft_config(LoraConfig(), UNET.lora_targets, UNET.conv_targets).to_dict() == old.to_dict()


def test_the_lycoris_conversion_round_trips_and_matches_the_readers_scale():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sds = {
        "unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w1_a": r(8, 2),
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w1_b": r(2, 8),
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w2_a": r(8, 2),
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w2_b": r(2, 8),
                 "mid_block.resnets.0.conv1.lokr_w1": r(4, 4), "mid_block.resnets.0.conv1.lokr_w2": r(4, 4, 3, 3)},
        "text_encoder": {"encoder.layers.0.self_attn.q_proj.lokr_w1": r(4, 4),
                         "encoder.layers.0.self_attn.q_proj.lokr_w2_a": r(8, 2),
                         "encoder.layers.0.self_attn.q_proj.lokr_w2_b": r(2, 8)},
    }
    scales = {"unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4.0, 2),
                       "mid_block.resnets.0.conv1": (8.0, 4)},
              "text_encoder": {"encoder.layers.0.self_attn.q_proj": (1.0, 2)}}
    kohya = peft_to_kohya(sds, PREFIXES_SD, scales)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float(kohya[f"{q}.alpha"]) == 4.0 and torch.equal(kohya[f"{q}.hada_w1_a"], sds["unet"][
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w1_a"])
    # Both LoKr factors full: the readers apply scale 1, so PEFT's alpha / r = 2 is folded into lokr_w1.
    conv = "lora_unet_mid_block_resnets_0_conv1"
    assert float(kohya[f"{conv}.alpha"]) == 4.0
    assert torch.equal(kohya[f"{conv}.lokr_w1"], sds["unet"]["mid_block.resnets.0.conv1.lokr_w1"] * 2)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w2_b" in kohya
    back = kohya_to_peft(kohya, PREFIXES_SD, scales)
    assert back.keys() == sds.keys()
    for network, sd in sds.items():
        assert back[network].keys() == sd.keys()
        for k, v in sd.items():
            assert torch.equal(back[network][k], v), k
    with pytest.raises(KeyError, match="lora_unet_gone"):
        kohya_to_peft({"lora_unet_gone.alpha": torch.tensor(1.0)}, PREFIXES_SD, scales)


def test_sdxl_loha_adapts_both_text_encoders_under_kohyas_sdxl_prefixes(artifact_root, tmp_path):
    from safetensors.torch import load_file

    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.models.load import base_pipeline_loader

    base = resolve_base_model("embedded-sdxl", artifact_root)
    cfg = LoraConfig(variant="loha", train_text_encoder=True)
    method, models, ctx, _, ids = _train(base, tmp_path / "out", cfg)
    modules = {k.split(".")[0] for k in load_file(str(tmp_path / "out" / KOHYA_FILE))}
    for prefix in ("lora_unet_", "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"):
        assert any(m.startswith(prefix) for m in modules), prefix
    pipe = method.load_pipeline(base_pipeline_loader(base), tmp_path / "out", ctx)
    loaded = _outputs(pipe.unet, _encoders(pipe), ids, True)
    for a, b in zip(_outputs(models.denoiser, _encoders(models), ids, True), loaded):
        assert torch.equal(a, b)
