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

import functools
import gzip
import json
from contextlib import contextmanager
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
# The flow-matching families' schedulers (scheduler/scheduler_config.json of stable-diffusion-3-medium and of
# FLUX.1-dev) and VAEs (16 latent channels, no quant convs; their vae/config.json's shift and scaling factors).
_SD3_SCHEDULER = ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0})
_FLUX_SCHEDULER = ("FlowMatchEulerDiscreteScheduler", {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096})
_SD3_VAE = {"latent_channels": 16, "shift_factor": 0.0609, "scaling_factor": 1.5035, "use_quant_conv": False,
            "use_post_quant_conv": False}
_FLUX_VAE = {**_SD3_VAE, "shift_factor": 0.1159, "scaling_factor": 0.3611}
# The embedded T5 encoders' width (the joint attention's text width, as 4096 is the real T5 v1.1 XXL's).
_T5_WIDTH = 128


@dataclass(frozen=True)
class Shapes:
    """One buildable model: its family and each component's constructor arguments."""

    family: str
    resolution: int
    denoiser: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # each encoder's config arguments (its family's config_class)
    pad_tokens: tuple[str, ...]  # each CLIP tokenizer's pad token (a T5 tokenizer's is <pad>)
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
SPECS.update({
    # SD 3.x's MMDiT at the embedded models' width: 2x2 patches, two joint blocks of 4 heads; its CLIP encoders
    # differ in width (as CLIP-L's 768 and CLIP-G's 1280) and fit, side by side, in the T5 width they are padded to.
    "tiny-sd3": Shapes(
        "sd3", 64,
        {"sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
         "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": _T5_WIDTH,
         "caption_projection_dim": 32, "pooled_projection_dim": 32 + 64, "pos_embed_max_size": 48},
        {**_TINY_VAE, "sample_size": 64, **_SD3_VAE},
        (_clip(32, 2, 4, 37, 32, 49407, "quick_gelu"), _clip(64, 2, 4, 37, 64, 0, "gelu"), {}),
        ("<|endoftext|>", "!"), _SD3_SCHEDULER, {"image_encoder": None, "feature_extractor": None}),
    # Flux.1 dev's transformer (guidance-distilled) with one double and one single block: 16 latent channels
    # packed 2x2 into 64, rotary axes summing to the head width (16 = 4 + 6 + 6).
    "tiny-flux": Shapes(
        "flux", 64,
        {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": _T5_WIDTH, "pooled_projection_dim": 32,
         "guidance_embeds": True, "axes_dims_rope": (4, 6, 6)},
        {**_TINY_VAE, "sample_size": 64, **_FLUX_VAE},
        (_clip(32, 2, 4, 37, 32, 49407, "quick_gelu"), {}), ("<|endoftext|>",), _FLUX_SCHEDULER,
        {"image_encoder": None, "feature_extractor": None}),
})
# The real sizes of the flow-matching families (random weights, for the GPU benchmarks): FLUX.1-dev's
# transformer/config.json and SD 3.5 large's, their 16-channel VAE (vae/config.json), CLIP-L, CLIP-G and T5 v1.1
# XXL's encoder (text_encoder_2/config.json of FLUX.1-dev, text_encoder_3/ of SD 3.5).
_REAL_VAE_16 = {**_REAL_VAE, "sample_size": 1024, "latent_channels": 16, "use_quant_conv": False,
                "use_post_quant_conv": False}
_T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
           "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
           "relative_attention_num_buckets": 32, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
SPECS.update({
    "flux": Shapes(
        "flux", 1024,
        {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
         "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
         "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)},
        {**_REAL_VAE_16, **{k: _FLUX_VAE[k] for k in ("shift_factor", "scaling_factor")}},
        (_clip(768, 12, 12, 4 * 768, 768, 49407, "quick_gelu"), _T5_XXL), ("<|endoftext|>",), _FLUX_SCHEDULER,
        {"image_encoder": None, "feature_extractor": None}),
    "sd35": Shapes(  # SD 3.5 large
        "sd3", 1024,
        {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
         "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
         "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
         "qk_norm": "rms_norm"},
        {**_REAL_VAE_16, **{k: _SD3_VAE[k] for k in ("shift_factor", "scaling_factor")}},
        (_clip(768, 12, 12, 4 * 768, 768, 49407, "quick_gelu"), _clip(1280, 32, 20, 4 * 1280, 1280, 0, "gelu"),
         _T5_XXL),
        ("<|endoftext|>", "!"), _SD3_SCHEDULER, {"image_encoder": None, "feature_extractor": None}),
})
SHAPES = tuple(SPECS)
RESOLUTION = {name: spec.resolution for name, spec in SPECS.items()}
# Each published model's parameter count per component (what tests/test_embedded_models.py holds the builds to).
PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    # FLUX.1-dev: the 11.9 B transformer, T5 v1.1 XXL's 4.76 B encoder; SD 3.5 large: the "8.1 B" MMDiT, CLIP-L with
    # its projection, CLIP-G as SDXL's.
    "flux": {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
             "text_encoder_2": 4_762_310_656},
    "sd35": {"transformer": 8_056_627_520, "vae": 83_819_683, "text_encoder": 123_650_304,
             "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656},
}

# The embedded sources: source -> (the folder it is built into under base_models/, its shapes). Bump the folder
# name when what a build writes changes: it names the built model's cache.
EMBEDDED = "embedded"
EMBEDDED_SDXL = "embedded-sdxl"
EMBEDDED_SD3 = "embedded-sd3"
EMBEDDED_FLUX = "embedded-flux"
EMBEDDED_MODELS = {EMBEDDED: ("embedded-tiny-sd-v1", "tiny"), EMBEDDED_SDXL: ("embedded-tiny-sdxl-v1", "tiny-sdxl"),
                   EMBEDDED_SD3: ("embedded-tiny-sd3-v1", "tiny-sd3"), EMBEDDED_FLUX: ("embedded-tiny-flux-v1", "tiny-flux")}


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


def _clip_merges() -> list[tuple[str, str]]:
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    return [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]


# How many of CLIP's BPE merges (most frequent first) become pieces of the embedded T5 vocabulary.
_T5_MERGES = 16000


@functools.cache
def t5_vocabulary() -> tuple[tuple[str, float], ...]:
    """The embedded T5 tokenizer's SentencePiece-style unigram vocabulary, generated from the CLIP BPE merges that
    open_clip's wheel ships (no T5 vocabulary can be downloaded here): T5's special tokens first (<pad> 0, </s> 1,
    <unk> 2, as in T5 v1.1), then every printable ASCII character as a word start (``▁c``) and a continuation, then
    the first ``_T5_MERGES`` merged tokens: a word-final one (``photo</w>``) as the whole word ``▁photo``, another
    as a word piece. A piece's score is its merge's rank, negated, so frequent pieces win a segmentation."""
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    for c in map(chr, range(33, 127)):
        pieces.setdefault(f"\u2581{c}", -1e5)
        pieces.setdefault(c, -1e5)
    for rank, (a, b) in enumerate(_clip_merges()[:_T5_MERGES]):
        token = a + b
        piece = f"\u2581{token[:-4]}" if token.endswith("</w>") else token
        if piece.removeprefix("\u2581").isascii() and piece.strip("\u2581") and "</w>" not in piece:
            pieces.setdefault(piece, -float(rank + 1))
    return tuple(pieces.items())


def build_t5_tokenizer(max_length: int):
    """A T5 tokenizer (``T5TokenizerFast``, unigram model over :func:`t5_vocabulary`) that pads with <pad>, ends
    every sequence with </s> and reads ``max_length`` tokens, as T5 v1.1's does."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    backend = Tokenizer(models.Unigram(list(t5_vocabulary()), unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", extra_ids=0, model_max_length=max_length)


def _t5_config() -> dict[str, Any]:
    """The embedded T5 encoder: two layers at :data:`_T5_WIDTH`, relative attention buckets as T5 v1.1's (32)."""
    return {"vocab_size": len(t5_vocabulary()), "d_model": _T5_WIDTH, "d_ff": 2 * _T5_WIDTH, "d_kv": 32,
            "num_heads": 4, "num_layers": 2, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
            "is_gated_act": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def build_pipeline(shapes: str, device: str = "cpu", seed: int = _SEED, dtype: str | None = None):
    """The pipeline ``shapes`` names, weights initialized directly on ``device`` (seconds on a GPU, minutes for
    SD 1.5 on a small CPU; ``meta`` allocates nothing) in ``dtype`` (None: float32; FLUX.1 at its real size is
    48 GB in float32, 24 in bfloat16). The denoiser is seeded with ``seed``, the VAE with ``seed + 1``, the text
    encoders with ``seed + 2``, ``seed + 3``."""
    import contextlib
    import tempfile

    import torch
    import transformers

    if shapes not in SPECS:
        raise ValueError(f"shapes must be one of {SHAPES}, got {shapes!r}")
    spec, family = SPECS[shapes], FAMILIES[SPECS[shapes].family]
    with torch.device(device), (_default_dtype(getattr(torch, dtype)) if dtype else contextlib.nullcontext()):
        torch.manual_seed(seed)
        denoiser = diffusers_class(family.denoiser.model_class)(**spec.denoiser)
        torch.manual_seed(seed + 1)
        vae = diffusers_class(family.vae_class)(**spec.vae)
        encoders = []
        for i, (encoder, config) in enumerate(zip(family.text_encoders, spec.text_encoders)):
            torch.manual_seed(seed + 2 + i)
            config = config or _t5_config()  # the one T5 encoder's config is generated with its vocabulary
            encoders.append(getattr(transformers, encoder.model_class)(getattr(transformers, encoder.config_class)(
                **config)))
    parts = {family.denoiser.component: denoiser, "vae": vae}
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir))
        pads = iter(spec.pad_tokens)
        for encoder, model in zip(family.text_encoders, encoders):
            parts[encoder.component] = model
            if encoder.config_class == "T5Config":
                parts[encoder.tokenizer] = build_t5_tokenizer(encoder.max_length)
            else:
                parts[encoder.tokenizer] = getattr(transformers, encoder.tokenizer_class)(
                    f"{tok_dir}/vocab.json", f"{tok_dir}/merges.txt", pad_token=next(pads), model_max_length=77)
    scheduler_class, scheduler_args = spec.scheduler
    return diffusers_class(family.pipeline_class)(**parts, scheduler=diffusers_class(scheduler_class)(**scheduler_args),
                                                  **spec.pipeline)


@contextmanager
def _default_dtype(dtype):
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


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
    pipe = build_pipeline(shapes, device, dtype=None if dtype == "float32" else dtype)
    pipe.to(dtype=getattr(torch, dtype))
    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return folder
