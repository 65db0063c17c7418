"""The base Stable Diffusion model: the embedded tiny defaults (built offline, deterministically) and the
user-configured alternatives (a local diffusers folder, a single-file checkpoint, or a hub id).

The embedded models have random weights: they exercise every code path (tokenizers, text encoders, U-Net, VAE,
scheduler) at a size that trains in seconds on a CPU. ``embedded`` is an SD 1.x pipeline, ``embedded-sdxl`` an
SDXL one (two text encoders, text_time conditioning). Their tokenizers are Stable Diffusion's own: the CLIP BPE
vocabulary that open_clip's wheel ships, so token ids equal SD's ("a photo of" -> 320 1125 539).

Every resolved model carries its family (``assets_pipeline.families``: sd1, sd2, sdxl) and prediction type,
read from its configs without loading weights.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assets_pipeline.families import (
    ModelFamily, detect_checkpoint_family, detect_folder_family, get_family, pipeline_class,
)
from assets_pipeline.hashing import digest, sha256_file
from assets_pipeline.store import atomic_dir, write_json_atomic

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

# The deployment's default base model (any value `BaseModelResource.source` takes); explicit config wins.
BASE_MODEL_ENV = "ASSETS_PIPELINE_BASE_MODEL"
EMBEDDED = "embedded"
# Bump when the builder below changes what it writes; it names the cache folder of the built model.
EMBEDDED_NAME = "embedded-tiny-sd-v1"
EMBEDDED_RESOLUTION = 64
EMBEDDED_SDXL = "embedded-sdxl"
EMBEDDED_SDXL_NAME = "embedded-tiny-sdxl-v1"  # bump, as EMBEDDED_NAME, when build_embedded_sdxl_pipeline changes
EMBEDDED_SDXL_RESOLUTION = 64
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


def build_embedded_sdxl_pipeline() -> StableDiffusionXLPipeline:
    """Build the tiny random-weight SDXL pipeline in memory; seeded per component so bytes are reproducible.

    Shapes follow diffusers' tiny SDXL test pipeline (tests/pipelines/stable_diffusion_xl,
    ``get_dummy_components``) at the embedded SD model's widths: a 2-level U-Net with text_time conditioning and
    2 transformer layers in its cross-attention level, a 2-level VAE (64 px -> 32x32x4 latents), and two CLIP
    text encoders with SD's real vocabulary. The encoders differ in width (32 and 64, as CLIP-L's 768 and
    OpenCLIP-G's 1280 do): diffusers' single-file loader tells them apart by that width.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    widths, projection_dim, time_embed_dim = (32, 64), 32, 8
    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=EMBEDDED_SDXL_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 2),
        # The pooled text embedding plus six add_time_ids, each embedded in time_embed_dim (SDXL: 6*256 + 1280).
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        cross_attention_dim=sum(widths),  # both encoders' hidden states, concatenated
    )
    torch.manual_seed(_SEED + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=EMBEDDED_SDXL_RESOLUTION,
        scaling_factor=0.13025,  # SDXL's VAE (vae/config.json of stable-diffusion-xl-base-1.0)
        force_upcast=True,
    )
    encoders = []
    for i, (cls, width, act, pad_id) in enumerate([
        (CLIPTextModel, widths[0], "quick_gelu", 49407),  # CLIP ViT-L/14's text tower; pads with <|endoftext|>
        (CLIPTextModelWithProjection, widths[1], "gelu", 0),  # OpenCLIP ViT-bigG's; pads with "!" (id 0)
    ]):
        torch.manual_seed(_SEED + 2 + i)
        encoders.append(cls(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=projection_dim, hidden_act=act,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id,
        )))
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir))
        files = (f"{tok_dir}/vocab.json", f"{tok_dir}/merges.txt")
        tokenizer = CLIPTokenizer(*files, pad_token="<|endoftext|>", model_max_length=77)
        tokenizer_2 = CLIPTokenizer(*files, pad_token="!", model_max_length=77)  # as SDXL's tokenizer_2
    # SDXL base's scheduler/scheduler_config.json (the EulerDiscreteScheduler arguments among its keys).
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,  # SDXL base's model_index.json
        add_watermarker=False,
    )


# source -> (folder name, builder, default resolution) of each embedded model.
_EMBEDDED_MODELS = {
    EMBEDDED: (EMBEDDED_NAME, build_embedded_pipeline, EMBEDDED_RESOLUTION),
    EMBEDDED_SDXL: (EMBEDDED_SDXL_NAME, build_embedded_sdxl_pipeline, EMBEDDED_SDXL_RESOLUTION),
}


def _ensure_built(base_models_dir: Path, source: str) -> Path:
    name, build, _ = _EMBEDDED_MODELS[source]
    target = base_models_dir / name
    if (target / "model_index.json").is_file():
        return target
    with atomic_dir(target) as tmp:
        build().save_pretrained(tmp, safe_serialization=True)
    return target


def ensure_embedded_model(base_models_dir: Path) -> Path:
    """Build the embedded model into ``base_models_dir`` once (atomically) and return its folder."""
    return _ensure_built(base_models_dir, EMBEDDED)


def ensure_embedded_sdxl_model(base_models_dir: Path) -> Path:
    """Build the embedded SDXL model into ``base_models_dir`` once (atomically) and return its folder."""
    return _ensure_built(base_models_dir, EMBEDDED_SDXL)


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

    source: str  # "embedded", "embedded-sdxl", a folder, a single file, or a hub id
    kind: str  # "embedded" | "folder" | "single_file" | "hub"
    location: str  # folder or file path, or hub id
    fingerprint: str
    resolution: int
    family: str  # a key of assets_pipeline.families.FAMILIES: "sd1" | "sd2" | "sdxl"
    prediction_type: str  # the scheduler's: "epsilon" | "v_prediction" | "sample"
    single_file_config: str | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == "embedded"

    @property
    def model_family(self) -> ModelFamily:
        return get_family(self.family)

    def describe(self) -> dict[str, Any]:
        """What metadata and lineage record about the base model (the fingerprint covers its configs too)."""
        return {"source": self.source, "kind": self.kind, "family": self.family,
                "prediction_type": self.prediction_type, "resolution": self.resolution,
                "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class ConceptBaseModelConfig:
    """concept.toml's ``[base_model]``: a concept trained on another model than the deployment's. It wins over
    the ``base_model`` resource and ``$ASSETS_PIPELINE_BASE_MODEL`` for this concept only, so a team keeps SD 1.5
    and SDXL concepts in one deployment; editing it is a change to the concept, so its outputs rebuild."""

    source: str = field(default="", metadata={
        "help": "Same values as the base_model resource's source ('embedded', 'embedded-sdxl', a diffusers folder, "
        "a single-file checkpoint, a hub id); empty = the deployment's base model."})
    single_file_config: str | None = field(default=None, metadata={
        "help": "For a single-file source: a local diffusers folder holding its configs."})

    def __post_init__(self) -> None:
        if self.source != self.source.strip():
            raise ValueError(f"source {self.source!r} has leading or trailing spaces")
        if self.single_file_config and not self.source:
            raise ValueError("single_file_config is set but source is empty: it applies to a single-file source")


def resolve_base_model(
    source: str,
    artifact_root: Path,
    resolution: int | None = None,
    single_file_config: str | None = None,
    hub_cache_dir: str | None = None,
) -> BaseModelRef:
    """Turn the user's ``source`` setting into a :class:`BaseModelRef` (building an embedded model if needed).

    The family and prediction type come from the model's configs; the resolution, when not given, is the
    embedded model's own or the family's default (SD 2.x: 768 px for v-prediction models, else 512).
    """
    memo_dir = artifact_root / "base_models" / ".fingerprints"

    def from_folder(kind: str, folder: Path, default_resolution: int | None = None) -> BaseModelRef:
        family, prediction_type = detect_folder_family(folder)
        res = resolution or default_resolution or family.resolution_for(prediction_type)
        return BaseModelRef(source, kind, str(folder), cached_fingerprint(folder, memo_dir), res, family.name,
                            prediction_type)

    if source in _EMBEDDED_MODELS:
        return from_folder("embedded", _ensure_built(artifact_root / "base_models", source),
                           _EMBEDDED_MODELS[source][2])
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
        return from_folder("folder", path)
    if path.suffix in _WEIGHT_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"single-file checkpoint {path} does not exist")
        family = detect_checkpoint_family(path)
        prediction_type = family.default_prediction_type
        if single_file_config:
            config_family, prediction_type = detect_folder_family(Path(single_file_config))
            if config_family != family:
                raise ValueError(f"single-file checkpoint {path} is an {family.name} model but its config folder "
                                 f"{single_file_config} is {config_family.name}: single_file_config must hold "
                                 f"the same family's configs")
        return BaseModelRef(source, "single_file", str(path), cached_fingerprint(path, memo_dir),
                            resolution or family.resolution_for(prediction_type), family.name, prediction_type,
                            single_file_config)
    if source.count("/") == 1 and not path.exists():
        from huggingface_hub import snapshot_download

        # Resolved at the user's site: with HF_HUB_OFFLINE=1 this reads the local hub cache only.
        folder = Path(snapshot_download(source, cache_dir=hub_cache_dir,
                                        local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
        return from_folder("hub", folder)
    raise FileNotFoundError(
        f"base model {source!r} is neither one of {sorted(_EMBEDDED_MODELS)}, a diffusers folder, a checkpoint "
        f"file ({', '.join(_WEIGHT_SUFFIXES)}) nor a hub id 'org/name'"
    )


def quiet_progress_bars() -> None:
    """Loading bars from diffusers/transformers would flood run logs; progress is reported by our own logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(ref: BaseModelRef, torch_dtype: Any = None) -> DiffusionPipeline:
    """The base model as its family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)."""
    cls = pipeline_class(ref.model_family)
    quiet_progress_bars()
    # diffusers 0.42 names it dtype (torch_dtype is deprecated there, to be removed in 1.0)
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if ref.kind == "single_file":
        if ref.single_file_config:
            kwargs["config"] = ref.single_file_config
        return cls.from_single_file(ref.location, local_files_only=True, **kwargs)
    return cls.from_pretrained(ref.location, local_files_only=True, **kwargs)


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


def load_tokenizers(ref: BaseModelRef) -> tuple[Any, ...]:
    """The base model's own tokenizers, one per text encoder in its family's order (``model_max_length`` is how
    many tokens each encoder reads), from their folders without loading any weights. A single-file checkpoint
    has none: its config folder's when one is set, else its whole pipeline is loaded for them (as diffusers
    infers tokenizers)."""
    from transformers import CLIPTokenizer

    names = ref.model_family.tokenizers
    folder = ref.location if ref.kind != "single_file" else ref.single_file_config
    if folder and all((Path(folder) / name).is_dir() for name in names):
        return tuple(CLIPTokenizer.from_pretrained(folder, subfolder=name, local_files_only=True) for name in names)
    if ref.kind != "single_file":
        missing = [name for name in names if not (Path(folder) / name).is_dir()]
        raise FileNotFoundError(f"{folder}: no {missing} folder; a {ref.family} model has tokenizers {list(names)}")
    pipe = load_pipeline(ref)
    return tuple(getattr(pipe, name) for name in names)


def load_tokenizer(ref: BaseModelRef):
    """The base model's first (for SD 1.x/2.x its only) tokenizer: see :func:`load_tokenizers`."""
    return load_tokenizers(ref)[0]


def load_encoders(ref: BaseModelRef, artifact_root: Path, device: str = "cpu"):
    """The frozen VAE, text encoders and tokenizers (loaded on first use), with their fingerprints: (vae,
    text_encoder, tokenizer) and, for SDXL, (text_encoder_2, tokenizer_2) after them."""
    from assets_pipeline.stages.latents import Encoders

    family = ref.model_family

    def load():
        quiet_progress_bars()
        dev = resolve_device(device)
        if ref.kind == "single_file":
            pipe = load_pipeline(ref)
            vae = pipe.vae
            encoders = [getattr(pipe, name) for name in family.text_encoders]
            tokenizers = [getattr(pipe, name) for name in family.tokenizers]
        else:
            from diffusers import AutoencoderKL
            from transformers import CLIPTextModel, CLIPTextModelWithProjection

            vae = AutoencoderKL.from_pretrained(ref.location, subfolder="vae", local_files_only=True)
            # SDXL's last encoder is the projected one: its pooled embedding conditions the U-Net.
            classes = [CLIPTextModel] * (family.num_text_encoders - 1) + [
                CLIPTextModelWithProjection if family.text_time_conditioning else CLIPTextModel]
            encoders = [cls.from_pretrained(ref.location, subfolder=name, local_files_only=True)
                        for cls, name in zip(classes, family.text_encoders)]
            tokenizers = list(load_tokenizers(ref))
        loaded = [vae.to(dev).eval()]
        for encoder, tokenizer in zip(encoders, tokenizers):
            loaded += [encoder.to(dev).eval(), tokenizer]
        return tuple(loaded)

    scaling_factor = None
    if ref.kind != "single_file":  # read from the config alone, without loading weights
        vae_config = json.loads((Path(ref.location) / "vae" / "config.json").read_text())
        scaling_factor = vae_config.get("scaling_factor", 0.18215)  # diffusers' AutoencoderKL default
    text_fp = digest(*(component_fingerprint(ref, name, artifact_root)
                       for pair in zip(family.text_encoders, family.tokenizers) for name in pair))
    return Encoders(load, vae_fingerprint=component_fingerprint(ref, "vae", artifact_root),
                    text_fingerprint=text_fp, scaling_factor_hint=scaling_factor, device=device,
                    text_time=family.text_time_conditioning)
