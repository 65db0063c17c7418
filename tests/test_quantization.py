"""LoRA over a quantized frozen base (training/quantization.py): torchao's float8 and int8 weight-only linears on
the embedded Flux.1 and SD models (they run on the CPU), PEFT's LoRA layers over them, a single file loaded
quantized, and what is refused before any model loads (nf4 without CUDA, a missing package, a variant PEFT cannot
put over quantized linears). Training through Dagster with a float8 base: tests/test_flow.py's Flux build."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from assets_pipeline.training.methods.base import Models, TrainingInputError
from assets_pipeline.training.quantization import (check_quantization, is_quantized, loading_kwargs,
                                                   quantize_loaded, quantized_bytes)

STORED = {"float8": torch.float8_e4m3fn, "int8": torch.int8}


def _stored_dtype(weight):
    return weight.qdata.dtype  # torchao's Float8Tensor / Int8Tensor keep the quantized values in qdata


@pytest.mark.parametrize("kind", ["float8", "int8"])
def test_the_frozen_base_loads_quantized_and_lora_trains_over_it(flux_ref, kind):
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import TrainContext

    full = Models.load(flux_ref, False)
    assert loading_kwargs(kind, torch.float32) is None  # torchao quantizes the loaded model
    models = Models.load(flux_ref, False)
    denoiser = models.denoiser = quantize_loaded(models.denoiser, kind, torch.float32, "cpu")
    q = denoiser.transformer_blocks[0].attn.to_q.weight
    assert is_quantized(denoiser) and not is_quantized(full.denoiser)
    assert _stored_dtype(q) == STORED[kind] and q.shape == full.denoiser.transformer_blocks[0].attn.to_q.weight.shape
    assert quantized_bytes(denoiser) < quantized_bytes(full.denoiser)  # 1 byte a linear weight, not 4
    # The same prediction up to the quantization error.
    batch = type("Batch", (), {"pooled_embeds": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))})()
    g = torch.Generator().manual_seed(0)
    noisy, embeds = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 512, 128, generator=g)
    t = torch.tensor([500.0, 300.0])
    with torch.no_grad():
        ref = models.family.denoiser.predict(full.denoiser, noisy, t, embeds, batch)
        pred = models.family.denoiser.predict(denoiser, noisy, t, embeds, batch)
    assert 0 < (pred - ref).abs().max() < 0.05 * ref.abs().max()

    # The LoRA method's own prepare puts PEFT's torchao LoRA layers over the quantized linears; they train.
    method = get_method("lora")
    cfg = method.config_cls(**{**method.default_config(3, quick=True), "base_quantization": kind})
    ctx = TrainContext(concept="c", token="sks", class_noun="dog", resolution=64, num_instance_images=3, family="flux")
    assert method.prepare(models, cfg, ctx) == ["transformer"]
    assert type(denoiser.transformer_blocks[0].attn.to_q).__name__ == "TorchaoLoraLinear"
    trained = [p for p in denoiser.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    models.family.denoiser.predict(denoiser, noisy, t, embeds, batch).pow(2).mean().backward()
    assert all(p.grad is not None for p in trained) and any(p.grad.abs().sum() > 0 for p in trained)


def test_a_single_file_checkpoints_denoiser_is_quantized_with_the_files_weights(tiny_pipe, embedded_model_dir, tmp_path):
    from safetensors.torch import save_file

    from assets_pipeline.models.load import load_components
    from assets_pipeline.models.resolve import resolve_base_model
    from ldm_checkpoint import pipeline_to_ldm_state_dict

    ckpt = tmp_path / "tiny-sd.safetensors"
    save_file(pipeline_to_ldm_state_dict(tiny_pipe), str(ckpt))
    ref = resolve_base_model(str(ckpt), tmp_path / "art", single_file_config=str(embedded_model_dir))
    unet = quantize_loaded(load_components(ref, ("denoiser",)).denoiser, "int8", torch.float32, "cpu")
    assert is_quantized(unet) and _stored_dtype(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
                                                .weight) == torch.int8
    # The weights are the file's: the dequantized projection is the original one up to int8 rounding.
    original = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    restored = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.dequantize()
    assert torch.allclose(restored, original, atol=original.abs().max().item() / 100)


def test_what_a_quantized_base_refuses_before_any_model_loads(monkeypatch):
    from assets_pipeline.partitions.concept_spec import parse_concept_toml

    with pytest.raises(TrainingInputError, match=r'\[lora\] base_quantization = "nf4" needs a CUDA GPU.*"int8"'):
        check_quantization("nf4", cuda=False, section="lora")
    check_quantization("int8", cuda=False, section="lora")  # torchao runs on the CPU
    check_quantization(None, cuda=False, section="lora")

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(TrainingInputError, match=r'base_quantization = "float8" needs the torchao package.*pip install'):
        check_quantization("float8", cuda=True, section="lora")
    monkeypatch.undo()

    base = 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora"]\n[lora]\n'
    with pytest.raises(ValueError, match=r"c/concept.toml \[lora\]: base_quantization.*'float8', 'int8', 'nf4'.*'fp4'"):
        parse_concept_toml("c", base + 'base_quantization = "fp4"\n')
    with pytest.raises(ValueError, match=r"base_quantization = 'int8' works with variant 'lora' only.*'loha'"):
        parse_concept_toml("c", base + 'base_quantization = "int8"\nvariant = "loha"\n')
    spec = parse_concept_toml("c", base + 'base_quantization = "nf4"\n')  # valid where read; the trainer checks CUDA
    assert spec.overrides["lora"]["base_quantization"] == "nf4"


def test_lora_targets_flux_single_blocks_mlp_and_output_when_asked(flux_ref):
    """[lora] target_modules: Flux.1's single blocks' MLP and output projections (diffusers' --lora_layers), which
    the kohya file fuses into linear1 / linear2; a name the transformer lacks is refused with the setting."""
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import TrainContext
    from peft.utils import get_peft_model_state_dict

    method = get_method("lora")
    ctx = TrainContext(concept="c", token="sks", class_noun="dog", resolution=64, num_instance_images=3, family="flux")
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_mlp", "proj_out"]
    cfg = method.config_cls(**{**method.default_config(3, quick=True), "target_modules": targets})
    models = Models.load(flux_ref, False)
    method.prepare(models, cfg, ctx)
    single = models.denoiser.single_transformer_blocks[0]
    assert type(single.proj_mlp).__name__ == "Linear" and hasattr(single.proj_mlp, "lora_A")
    assert hasattr(single.proj_out, "lora_A") and not hasattr(models.denoiser.transformer_blocks[0].ff.net[2], "lora_A")
    from assets_pipeline.training.methods.lora import KOHYA_WRITERS

    kohya = KOHYA_WRITERS["flux"](models, cfg, {"transformer": get_peft_model_state_dict(models.denoiser)})
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in kohya)
    assert any(k.startswith("lora_unet_single_blocks_0_linear2.") for k in kohya)
    # "proj_out" is also the transformer's last projection: BFL's final_layer.linear, which diffusers reads back.
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    assert "lora_unet_final_layer_linear.lora_down.weight" in kohya
    back = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in kohya.items()
                                                   if k.startswith("lora_unet_final_layer_linear")})
    peft = get_peft_model_state_dict(models.denoiser)
    assert torch.equal(back["proj_out.lora_A.weight"], peft["proj_out.lora_A.weight"])
    assert torch.equal(back["proj_out.lora_B.weight"], peft["proj_out.lora_B.weight"])  # scale 1 (alpha = rank)
    # With alpha = 2 x rank, the scale is folded into up (diffusers ignores this module's alpha).
    doubled = KOHYA_WRITERS["flux"](models, dataclasses.replace(cfg, alpha=2.0 * cfg.rank),
                                    {"transformer": get_peft_model_state_dict(models.denoiser)})
    assert float(doubled["lora_unet_final_layer_linear.alpha"]) == cfg.rank
    assert torch.allclose(doubled["lora_unet_final_layer_linear.lora_up.weight"], 2 * peft["proj_out.lora_B.weight"])

    bad = method.config_cls(**{**method.default_config(3, quick=True), "target_modules": ["attn.to_qq"]})
    with pytest.raises(TrainingInputError, match=r"\[lora\] target_modules = \['attn.to_qq'\].*not found"):
        method.prepare(Models.load(flux_ref, False), bad, ctx)
    with pytest.raises(ValueError, match="target_modules must be a list of module names"):
        method.config_cls(target_modules="proj_mlp")
