"""models/embedded.py: the tiny embedded models (deterministic, offline, stock-loadable, SD's own tokenizer) and
the random-weight real-size models the GPU benchmarks and scripts/gpu_e2e.py train (each with its published
model's parameter count per component, running a forward at its resolution; built on PyTorch's meta device, so
nothing is allocated: shapes are checked, not values)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from assets_pipeline.models.embedded import EMBEDDED_SDXL, RESOLUTION, ensure_embedded
from assets_pipeline.models.resolve import fingerprint_model



def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("shapes", ["sd15", "sdxl"])
def test_real_size_models_have_the_published_shapes_and_run_a_forward(shapes):
    import torch

    from assets_pipeline.models.embedded import PARAMETERS, build_pipeline

    pipe = build_pipeline(shapes, "meta")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in PARAMETERS[shapes]}
    assert counts == PARAMETERS[shapes]
    res = RESOLUTION[shapes]
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    with torch.device("meta"):
        latents = pipe.vae.encode(torch.randn(2, 3, res, res)).latent_dist.mean
        assert latents.shape == (2, 4, res // factor, res // factor)
        ids = torch.zeros(2, 77, dtype=torch.long)
        if shapes == "sdxl":  # both towers' penultimate states, the second's pooled projection, six time ids
            first = pipe.text_encoder(ids, output_hidden_states=True)
            second = pipe.text_encoder_2(ids, output_hidden_states=True)
            embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            extra = {"added_cond_kwargs": {"text_embeds": second.text_embeds, "time_ids": torch.zeros(2, 6)}}
            assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
        else:
            embeds, extra = pipe.text_encoder(ids)[0], {}
        assert embeds.shape == (2, 77, pipe.unet.config.cross_attention_dim)
        pred = pipe.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=embeds, **extra).sample
    assert pred.shape == latents.shape and pred.device.type == "meta"


@pytest.mark.parametrize("shapes", ["flux", "sd35"])
def test_real_size_flow_models_have_the_published_shapes_and_run_a_training_forward(shapes):
    """FLUX.1-dev and SD 3.5 large at their real sizes: each component's parameter count, the family's text
    encoding (T5 at its full sequence length) and its denoiser's training call at 1024 px, on the meta device."""
    import torch

    from assets_pipeline.models.embedded import PARAMETERS, SPECS, build_pipeline
    from assets_pipeline.models.families import get_family
    from assets_pipeline.models.text import tokenize

    pipe = build_pipeline(shapes, "meta")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in PARAMETERS[shapes]}
    assert counts == PARAMETERS[shapes]
    family = get_family(SPECS[shapes].family)
    encoders = [getattr(pipe, e.component) for e in family.text_encoders]
    tokenizers = [getattr(pipe, e.tokenizer) for e in family.text_encoders]
    res = RESOLUTION[shapes]
    with torch.device("meta"):
        latents = pipe.vae.encode(torch.randn(1, 3, res, res)).latent_dist.mean
        assert latents.shape == (1, 16, res // 8, res // 8)
        ids = [t.to("meta") for t in tokenize(tokenizers, ["a photo of sks dog"], family.text_max_lengths())]
        embeds, pooled = family.encode_prompt(encoders, ids)
        t5 = family.text_max_lengths()[-1]
        assert embeds.shape == (1, t5 + (77 if shapes == "sd35" else 0), 4096)
        assert pooled.shape == (1, 2048 if shapes == "sd35" else 768)
        batch = type("Batch", (), {"pooled_embeds": pooled})()
        pred = family.denoiser.predict(pipe.transformer, latents, torch.tensor([500.0]), embeds, batch)
    assert pred.shape == latents.shape and pred.device.type == "meta"


def test_embedded_build_is_byte_identical_across_builds(embedded_model_dir, tmp_path):
    second = ensure_embedded(tmp_path / "base_models")
    first_files, second_files = files_of(embedded_model_dir), files_of(second)
    assert set(first_files) >= {"model_index.json", "unet/diffusion_pytorch_model.safetensors",
                                "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    assert first_files.keys() == second_files.keys()
    for name in first_files:
        assert first_files[name] == second_files[name], name
    assert fingerprint_model(embedded_model_dir) == fingerprint_model(second)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "base_models").iterdir())  # atomic build


def test_embedded_sdxl_build_is_byte_identical_across_builds(sdxl_ref, tmp_path):
    first, second = Path(sdxl_ref.location), ensure_embedded(tmp_path / "base_models", EMBEDDED_SDXL)
    files = {p.relative_to(first).as_posix(): p.read_bytes() for p in sorted(first.rglob("*")) if p.is_file()}
    again = {p.relative_to(second).as_posix(): p.read_bytes() for p in sorted(second.rglob("*")) if p.is_file()}
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(files)
    assert files.keys() == again.keys()
    for name in files:
        assert files[name] == again[name], name
    assert fingerprint_model(first) == fingerprint_model(second)

    index = json.loads(files["model_index.json"])
    assert (index["_class_name"], index["force_zeros_for_empty_prompt"]) == ("StableDiffusionXLPipeline", True)
    unet = json.loads(files["unet/config.json"])
    assert (unet["addition_embed_type"], unet["cross_attention_dim"]) == ("text_time", 32 + 64)
    assert json.loads(files["scheduler/scheduler_config.json"])["_class_name"] == "EulerDiscreteScheduler"


def test_embedded_loads_in_stock_diffusers(embedded_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded_model_dir, local_files_only=True)
    assert pipe.tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
    assert pipe.unet.config.sample_size * 2 == RESOLUTION["tiny"]
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49408


@pytest.mark.slow
def test_embedded_sdxl_loads_and_generates_in_stock_diffusers(sdxl_ref, tmp_path):
    """In a fresh interpreter that imports only diffusers: what a user of the published folder would do."""
    side = RESOLUTION["tiny-sdxl"]
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained({sdxl_ref.location!r}, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a photo of sks dog", num_inference_steps=2, height={side},
                   width={side}, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert out.shape == (1, {side}, {side}, 3), out.shape
        assert bool((out >= 0).all() and (out <= 1).all()) and out.std() > 0
        assert pipe.tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
        assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id == 0
        assert not any(m.startswith("assets_pipeline") for m in sys.modules)
        print("ok", type(pipe).__name__)
    """)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok StableDiffusionXLPipeline")


def test_tokenizer_matches_open_clips_reference(tmp_path):
    """SD's tokenizer built from open_clip's BPE file gives the same ids as open_clip's own tokenizer."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    from assets_pipeline.models.embedded import write_clip_tokenizer_files

    ref = SimpleTokenizer()
    text = "A photo of sks dog, naïve café-style portrait at 35mm!"
    write_clip_tokenizer_files(tmp_path)
    tok = CLIPTokenizer(f"{tmp_path}/vocab.json", f"{tmp_path}/merges.txt", pad_token="<|endoftext|>")
    ids = tok(text).input_ids
    assert ids == [ref.encoder["<start_of_text>"], *ref.encode(text), ref.encoder["<end_of_text>"]]
