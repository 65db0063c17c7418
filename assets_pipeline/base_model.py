"""The base Stable Diffusion model: the embedded tiny default (built offline, deterministically) and the
user-configured alternatives (a local diffusers folder, a single-file checkpoint, or a hub id).

The embedded model has random weights: it exercises every code path (tokenizer, text encoder, U-Net, VAE,
scheduler) at a size that trains in seconds on a CPU. Its tokenizer is Stable Diffusion's own: the CLIP BPE
vocabulary that open_clip's wheel ships, so token ids equal SD's ("a photo of" -> 320 1125 539).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assets_pipeline.hashing import digest, sha256_file
from assets_pipeline.store import atomic_dir, write_json_atomic

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

EMBEDDED = "embedded"
# Bump when the builder below changes what it writes; it names the cache folder of the built model.
EMBEDDED_NAME = "embedded-tiny-sd-v1"
EMBEDDED_RESOLUTION = 64
_SEED = 0
# Config keys that record library versions or load paths, not model content: left out of fingerprints so the
# same weights and architecture always have the same fingerprint. (transformers writes how a tokenizer was loaded,
# e.g. is_local / local_files_only, into the tokenizer_config.json of a re-saved pipeline.)
_VOLATILE_KEYS = {
    "_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash",
    "name_or_path", "is_local", "local_files_only", "tokenizer_file", "special_tokens_map_file",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


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


def build_embedded_pipeline() -> StableDiffusionPipeline:
    """Build the tiny random-weight SD pipeline in memory; seeded per component so bytes are reproducible.

    Shapes follow diffusers' own tiny test pipelines (tests/pipelines/stable_diffusion): 2-level U-Net with
    cross-attention, 2-level VAE (downsampling 2x, so 64 px images give 32x32x4 latents), 2-layer CLIP text
    encoder with SD's real 49,408-token vocabulary.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=EMBEDDED_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    torch.manual_seed(_SEED + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=EMBEDDED_RESOLUTION,
    )
    torch.manual_seed(_SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer(
            f"{tok_dir}/vocab.json", f"{tok_dir}/merges.txt", pad_token="<|endoftext|>", model_max_length=77
        )
    # Stable Diffusion v1's scheduler config (scheduler/scheduler_config.json of SD 1.5).
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ensure_embedded_model(base_models_dir: Path) -> Path:
    """Build the embedded model into ``base_models_dir`` once (atomically) and return its folder."""
    target = base_models_dir / EMBEDDED_NAME
    if (target / "model_index.json").is_file():
        return target
    with atomic_dir(target) as tmp:
        build_embedded_pipeline().save_pretrained(tmp, safe_serialization=True)
    return target


def _normalized_json(path: Path) -> Any:
    obj = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in _VOLATILE_KEYS}
    return obj


def fingerprint_model(path: Path) -> str:
    """Digest of a model's weights and configs (a diffusers folder or a single checkpoint file).

    Weight files are hashed byte for byte; JSON configs are compared without library-version keys. The result
    is memoized beside nothing: callers that fingerprint large models repeatedly use :func:`cached_fingerprint`.
    """
    if path.is_file():
        return digest("file", sha256_file(path))
    parts = []
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(path).as_posix()
        if f.suffix == ".json":
            parts.append((rel, _normalized_json(f)))
        elif f.suffix in _WEIGHT_SUFFIXES or f.suffix == ".txt":
            parts.append((rel, sha256_file(f)))
    if not parts:
        raise FileNotFoundError(f"no model files under {path}")
    return digest("folder", parts)


def cached_fingerprint(path: Path, memo_dir: Path) -> str:
    """:func:`fingerprint_model`, memoized by (path, size, mtime) of every file: hashing SD 1.5 (4 GB) takes
    seconds, and every asset that builds a cache key asks for it."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stat_key = digest(str(path.resolve()), [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    memo = memo_dir / f"{stat_key}.json"
    if memo.is_file():
        return json.loads(memo.read_text())["fingerprint"]
    fp = fingerprint_model(path)
    write_json_atomic(memo, {"path": str(path), "fingerprint": fp})
    return fp


@dataclass(frozen=True)
class BaseModelRef:
    """A resolved base model: how to load it and the fingerprint every downstream cache key includes."""

    source: str  # "embedded", a folder, a single file, or a hub id
    kind: str  # "embedded" | "folder" | "single_file" | "hub"
    location: str  # folder or file path, or hub id
    fingerprint: str
    resolution: int
    single_file_config: str | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == "embedded"


def resolve_base_model(
    source: str,
    artifact_root: Path,
    resolution: int | None = None,
    single_file_config: str | None = None,
    hub_cache_dir: str | None = None,
) -> BaseModelRef:
    """Turn the user's ``source`` setting into a :class:`BaseModelRef` (building the embedded model if needed)."""
    memo_dir = artifact_root / "base_models" / ".fingerprints"
    if source == EMBEDDED:
        folder = ensure_embedded_model(artifact_root / "base_models")
        return BaseModelRef(source, "embedded", str(folder), cached_fingerprint(folder, memo_dir),
                            resolution or EMBEDDED_RESOLUTION)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
        return BaseModelRef(source, "folder", str(path), cached_fingerprint(path, memo_dir), resolution or 512)
    if path.suffix in _WEIGHT_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"single-file checkpoint {path} does not exist")
        return BaseModelRef(source, "single_file", str(path), cached_fingerprint(path, memo_dir),
                            resolution or 512, single_file_config)
    if source.count("/") == 1 and not path.exists():
        from huggingface_hub import snapshot_download

        # Resolved at the user's site: with HF_HUB_OFFLINE=1 this reads the local hub cache only.
        folder = Path(snapshot_download(source, cache_dir=hub_cache_dir,
                                        local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
        return BaseModelRef(source, "hub", str(folder), cached_fingerprint(folder, memo_dir), resolution or 512)
    raise FileNotFoundError(
        f"base model {source!r} is neither 'embedded', a diffusers folder, a checkpoint file "
        f"({', '.join(_WEIGHT_SUFFIXES)}) nor a hub id 'org/name'"
    )


def quiet_progress_bars() -> None:
    """Loading bars from diffusers/transformers would flood run logs; progress is reported by our own logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(ref: BaseModelRef, torch_dtype: Any = None) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    quiet_progress_bars()
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if ref.kind == "single_file":
        if ref.single_file_config:
            kwargs["config"] = ref.single_file_config
        return StableDiffusionPipeline.from_single_file(ref.location, local_files_only=True, **kwargs)
    return StableDiffusionPipeline.from_pretrained(ref.location, local_files_only=True, **kwargs)


def component_fingerprint(ref: BaseModelRef, component: str, artifact_root: Path) -> str:
    """Fingerprint of one component (``vae``, ``text_encoder`` + ``tokenizer``, ...), so e.g. fine-tuning the
    U-Net of a base model does not invalidate cached VAE latents."""
    if ref.kind == "single_file":
        return digest(ref.fingerprint, component)
    memo = artifact_root / "base_models" / ".fingerprints"
    return digest(component, cached_fingerprint(Path(ref.location) / component, memo))


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; anything else as given. Imports torch only here,
    at the moment a model is actually loaded."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(ref: BaseModelRef):
    """The base model's own tokenizer (``model_max_length`` is how many tokens its text encoder reads), from its
    ``tokenizer/`` folder without loading any weights. A single-file checkpoint has none: its config folder's
    when one is set, else its whole pipeline is loaded for it (as diffusers infers the tokenizer)."""
    from transformers import CLIPTokenizer

    if ref.kind != "single_file":
        return CLIPTokenizer.from_pretrained(ref.location, subfolder="tokenizer", local_files_only=True)
    if ref.single_file_config and (Path(ref.single_file_config) / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(ref.single_file_config, subfolder="tokenizer", local_files_only=True)
    return load_pipeline(ref).tokenizer


def load_encoders(ref: BaseModelRef, artifact_root: Path, device: str = "cpu"):
    """The frozen VAE, text encoder and tokenizer (loaded on first use), with their fingerprints."""
    from assets_pipeline.stages.latents import Encoders

    def load():
        quiet_progress_bars()
        dev = resolve_device(device)
        if ref.kind == "single_file":
            pipe = load_pipeline(ref)
            vae, text_encoder, tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        else:
            from diffusers import AutoencoderKL
            from transformers import CLIPTextModel

            vae = AutoencoderKL.from_pretrained(ref.location, subfolder="vae", local_files_only=True)
            text_encoder = CLIPTextModel.from_pretrained(ref.location, subfolder="text_encoder",
                                                         local_files_only=True)
            tokenizer = load_tokenizer(ref)
        return vae.to(dev).eval(), text_encoder.to(dev).eval(), tokenizer

    scaling_factor = None
    if ref.kind != "single_file":  # read from the config alone, without loading weights
        vae_config = json.loads((Path(ref.location) / "vae" / "config.json").read_text())
        scaling_factor = vae_config.get("scaling_factor", 0.18215)  # diffusers' AutoencoderKL default
    text_fp = digest(component_fingerprint(ref, "text_encoder", artifact_root),
                     component_fingerprint(ref, "tokenizer", artifact_root))
    return Encoders(load, vae_fingerprint=component_fingerprint(ref, "vae", artifact_root),
                    text_fingerprint=text_fp, scaling_factor_hint=scaling_factor, device=device)
