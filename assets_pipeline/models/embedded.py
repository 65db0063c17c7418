"""Random-weight Stable Diffusion pipelines built offline: the tiny embedded base models and the real-size shapes.

No weights can be downloaded here, so everything trains on models built from configs. One spec table holds both:
- ``tiny`` (``source = "embedded"``) and ``tiny-sdxl`` (``"embedded-sdxl"``): the test models, at the shapes of
  diffusers' own tiny test pipelines (tests/pipelines/stable_diffusion and stable_diffusion_xl,
  ``get_dummy_components``): a 2-level U-Net (SDXL's with text_time conditioning and 2 transformer layers in its
  cross-attention level), a 2-level VAE (64 px -> 32x32x4 latents), 2-layer CLIP text encoders. SDXL's two
  encoders differ in width (32 and 64, as CLIP-L's 768 and OpenCLIP-G's 1280 do): diffusers' single-file loader
  tells them apart by that width. They train in seconds on a CPU and exercise every code path.
- ``sd15`` and ``sdxl``: the published models' shapes (the config.json of each component of
  runwayml/stable-diffusion-v1-5: U-Net 859.5 M parameters, VAE 83.7 M, CLIP ViT-L/14 text tower 123.1 M;
  stabilityai/stable-diffusion-xl-base-1.0: U-Net 2567.5 M, the same VAE at SDXL's scaling factor, CLIP ViT-L/14
  123.1 M and OpenCLIP ViT-bigG/14 694.7 M text towers), for benchmarks and the GPU end-to-end run: the compute
  and memory of a step do not depend on the weights' values.

Every model's tokenizers are Stable Diffusion's own, from the CLIP BPE vocabulary that open_clip's wheel ships, so
token ids equal SD's ("a photo of" -> 320 1125 539), and its scheduler is the published model's config. Each
component is seeded on its own, so a build is reproducible byte for byte.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assets_pipeline.models.families import FAMILIES, diffusers_class

_SEED = 0


def _clip(width: int, layers: int, heads: int, intermediate: int, projection_dim: int, pad_id: int,
          act: str | None = None) -> dict[str, Any]:
    """A CLIPTextConfig with SD's vocabulary and 77 positions."""
    return {"vocab_size": 49408, "hidden_size": width, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "max_position_embeddings": 77, "projection_dim": projection_dim,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": pad_id,
            **({"hidden_act": act} if act else {})}


# Stable Diffusion v1's scheduler config (scheduler/scheduler_config.json of SD 1.5) and SDXL base's (the
# EulerDiscreteScheduler arguments among its keys).
_SD_SCHEDULER = ("PNDMScheduler", {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                   "num_train_timesteps": 1000, "skip_prk_steps": True, "set_alpha_to_one": False,
                                   "steps_offset": 1})
_SDXL_SCHEDULER = ("EulerDiscreteScheduler", {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False, "steps_offset": 1,
    "timestep_spacing": "leading"})
_SD_PIPELINE = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
_SDXL_PIPELINE = {"force_zeros_for_empty_prompt": True, "add_watermarker": False}  # SDXL base's model_index.json
# SDXL's VAE (vae/config.json of stable-diffusion-xl-base-1.0): its scaling factor, and it overflows in fp16.
_SDXL_VAE = {"scaling_factor": 0.13025, "force_upcast": True}
# Each encoder's pad token: CLIP ViT-L/14 pads with <|endoftext|>, OpenCLIP ViT-bigG with "!" (id 0).
_PADS = {"<|endoftext|>": 49407, "!": 0}


@dataclass(frozen=True)
class Shapes:
    """One buildable model: its family and each component's constructor arguments."""

    family: str
    resolution: int
    denoiser: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # CLIPTextConfig arguments, in the family's encoder order
    pad_tokens: tuple[str, ...]  # each tokenizer's pad token
    scheduler: tuple[str, dict[str, Any]]
    pipeline: dict[str, Any] = field(default_factory=dict)  # the pipeline's own arguments


_TINY_VAE = {"block_out_channels": (32, 64), "in_channels": 3, "out_channels": 3,
             "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
             "latent_channels": 4}
_REAL_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
             "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}

SPECS: dict[str, Shapes] = {
    "tiny": Shapes(
        "sd1", 64,
        {"block_out_channels": (32, 64), "layers_per_block": 2, "sample_size": 32, "in_channels": 4, "out_channels": 4,
         "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
         "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "attention_head_dim": 4},
        {**_TINY_VAE, "sample_size": 64},
        (_clip(32, 2, 4, 37, 32, 49407),), ("<|endoftext|>",), _SD_SCHEDULER, _SD_PIPELINE),
    "tiny-sdxl": Shapes(
        "sdxl", 64,
        {"block_out_channels": (32, 64), "layers_per_block": 2, "sample_size": 32, "in_channels": 4, "out_channels": 4,
         "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
         "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "attention_head_dim": (2, 4),
         "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
         "transformer_layers_per_block": (1, 2),
         # The pooled text embedding plus six add_time_ids, each embedded in addition_time_embed_dim (SDXL:
         # 6*256 + 1280); cross-attention over both encoders' hidden states, concatenated (32 + 64).
         "projection_class_embeddings_input_dim": 6 * 8 + 32, "cross_attention_dim": 32 + 64},
        {**_TINY_VAE, "sample_size": 64, **_SDXL_VAE},
        (_clip(32, 2, 4, 37, 32, 49407, "quick_gelu"), _clip(64, 2, 4, 37, 32, 0, "gelu")),
        ("<|endoftext|>", "!"), _SDXL_SCHEDULER, _SDXL_PIPELINE),
    # UNet2DConditionModel's defaults are SD 1.x's blocks; only the text width differs (768).
    "sd15": Shapes(
        "sd1", 512,
        {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
         "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2},
        {**_REAL_VAE, "sample_size": 512},
        (_clip(768, 12, 12, 4 * 768, 768, 49407, "quick_gelu"),), ("<|endoftext|>",), _SD_SCHEDULER, _SD_PIPELINE),
    "sdxl": Shapes(  # unet/config.json of SDXL base 1.0
        "sdxl", 1024,
        {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
         "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
         "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
         "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048,
         "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
         "projection_class_embeddings_input_dim": 2816},  # 6 time ids x 256 + the pooled 1280
        {**_REAL_VAE, "sample_size": 1024, **_SDXL_VAE},
        (_clip(768, 12, 12, 4 * 768, 768, 49407, "quick_gelu"), _clip(1280, 32, 20, 4 * 1280, 1280, 0, "gelu")),
        ("<|endoftext|>", "!"), _SDXL_SCHEDULER, _SDXL_PIPELINE),
}
SHAPES = tuple(SPECS)
RESOLUTION = {name: spec.resolution for name, spec in SPECS.items()}
# Each published model's parameter count per component (what tests/test_embedded_models.py holds the builds to).
PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}

# The embedded sources: source -> (the folder it is built into under base_models/, its shapes). Bump the folder
# name when what a build writes changes: it names the built model's cache.
EMBEDDED = "embedded"
EMBEDDED_SDXL = "embedded-sdxl"
EMBEDDED_MODELS = {EMBEDDED: ("embedded-tiny-sd-v1", "tiny"), EMBEDDED_SDXL: ("embedded-tiny-sdxl-v1", "tiny-sdxl")}


def write_clip_tokenizer_files(out_dir: Path) -> None:
    """Write vocab.json + merges.txt for SD's CLIP tokenizer from open_clip's bundled BPE merges.

    Mirrors ``open_clip.tokenizer.SimpleTokenizer.__init__``: 256 byte tokens, the same with '</w>', the first
    48,894 merges, then the two special tokens — 49,408 ids in all, the vocabulary of openai/clip-vit-large-patch14.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def build_pipeline(shapes: str, device: str = "cpu", seed: int = _SEED):
    """The pipeline ``shapes`` names, weights initialized directly on ``device`` (seconds on a GPU, minutes for
    SD 1.5 on a small CPU; ``meta`` allocates nothing). The denoiser is seeded with ``seed``, the VAE with
    ``seed + 1``, the text encoders with ``seed + 2``, ``seed + 3``."""
    import tempfile

    import torch
    import transformers

    if shapes not in SPECS:
        raise ValueError(f"shapes must be one of {SHAPES}, got {shapes!r}")
    spec, family = SPECS[shapes], FAMILIES[SPECS[shapes].family]
    with torch.device(device):
        torch.manual_seed(seed)
        denoiser = diffusers_class(family.denoiser.model_class)(**spec.denoiser)
        torch.manual_seed(seed + 1)
        vae = diffusers_class(family.vae_class)(**spec.vae)
        encoders = []
        for i, (encoder, config) in enumerate(zip(family.text_encoders, spec.text_encoders)):
            torch.manual_seed(seed + 2 + i)
            encoders.append(getattr(transformers, encoder.model_class)(transformers.CLIPTextConfig(**config)))
    parts = {family.denoiser.component: denoiser, "vae": vae}
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir))
        for encoder, model, pad in zip(family.text_encoders, encoders, spec.pad_tokens):
            parts[encoder.component] = model
            parts[encoder.tokenizer] = getattr(transformers, encoder.tokenizer_class)(
                f"{tok_dir}/vocab.json", f"{tok_dir}/merges.txt", pad_token=pad, model_max_length=77)
    scheduler_class, scheduler_args = spec.scheduler
    return diffusers_class(family.pipeline_class)(**parts, scheduler=diffusers_class(scheduler_class)(**scheduler_args),
                                                  **spec.pipeline)


def build_denoiser(shapes: str):
    """The denoiser (U-Net) of ``shapes`` alone, random weights, on torch's current default device."""
    spec = SPECS[shapes]
    return diffusers_class(FAMILIES[spec.family].denoiser.model_class)(**spec.denoiser)


def ensure_embedded(base_models_dir: Path, source: str = EMBEDDED) -> Path:
    """Build the embedded model ``source`` into ``base_models_dir`` once (atomically) and return its folder."""
    from assets_pipeline.store import atomic_dir

    name, shapes = EMBEDDED_MODELS[source]
    target = base_models_dir / name
    if (target / "model_index.json").is_file():
        return target
    with atomic_dir(target) as tmp:
        build_pipeline(shapes).save_pretrained(tmp, safe_serialization=True)
    return target


def write_model_folder(shapes: str, folder: Path, device: str = "cpu", dtype: str = "float32") -> Path:
    """Save the pipeline as a diffusers folder (what ``base_model.source`` points at), once: an existing complete
    folder is reused. Written beside and renamed into place, so a folder that exists is complete."""
    import torch

    from assets_pipeline.store import atomic_dir

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    pipe = build_pipeline(shapes, device)
    pipe.to(dtype=getattr(torch, dtype))
    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return folder
