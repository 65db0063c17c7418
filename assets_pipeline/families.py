"""Stable Diffusion model families: what a base model is (SD 1.x, SD 2.x, SDXL) and what that implies.

A family is a row of facts, not a code path: the pipeline class that loads it, its default training
resolution, its text encoders and tokenizers, and whether its U-Net takes SDXL's extra conditioning (a pooled
text embedding plus the six "micro-conditioning" size numbers). Callers read these attributes instead of
comparing family names, so a new family is one more row here.

Detection reads configuration only (a diffusers folder's JSON files, a checkpoint's key names and shapes), never
weights. The SDXL text encoding below follows diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and
``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (``encode_prompt``, ``compute_time_ids``).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
PREDICTION_TYPES = (EPSILON, V_PREDICTION, "sample")  # diffusers' schedulers' `prediction_type` values


@dataclass(frozen=True)
class ModelFamily:
    """What a family of base models has in common. Every field is read by callers; none is decoration."""

    name: str
    # diffusers pipeline class for from_pretrained and from_single_file (both live on the same class).
    pipeline_class: str
    # Pipeline components that encode text, in the order their outputs are concatenated; tokenizers likewise.
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    # SDXL's U-Net also takes `added_cond_kwargs` = pooled text embedding + add_time_ids (addition_embed_type
    # "text_time"); SD 1.x/2.x's take only the token embeddings.
    text_time_conditioning: bool
    # The resolution the published models were trained at, and the one for v-prediction models where it
    # differs (SD 2.x: 512 px "base" models predict epsilon, the 768 px models v; stabilityai model cards).
    default_resolution: int
    v_prediction_resolution: int | None
    # Used only when no scheduler config says (a single file without a config folder): what diffusers' own
    # default config for the family has (SD 1.5 and SDXL base: epsilon; SD 2.1: v_prediction).
    default_prediction_type: str
    # U-Net cross_attention_dim of the published models (the text encoders' width), used to tell SD 2.x from
    # SD 1.x, whose folders differ in nothing else structural.
    cross_attention_dim: int
    # diffusers' single-file model types (`infer_diffusers_model_type`) of this family, and the key prefix of
    # its text encoder in an original-layout checkpoint (how the layout itself names the family).
    single_file_model_types: tuple[str, ...]
    single_file_text_prefix: str

    @property
    def num_text_encoders(self) -> int:
        return len(self.text_encoders)

    def resolution_for(self, prediction_type: str) -> int:
        if prediction_type == V_PREDICTION and self.v_prediction_resolution:
            return self.v_prediction_resolution
        return self.default_resolution


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("sd1", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), False, 512, None,
                    EPSILON, 768, ("v1",), "cond_stage_model.transformer."),
        ModelFamily("sd2", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), False, 512, 768,
                    V_PREDICTION, 1024, ("v2",), "cond_stage_model.model."),
        ModelFamily("sdxl", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"),
                    ("tokenizer", "tokenizer_2"), True, 1024, None, EPSILON, 2048, ("xl_base",),
                    "conditioner.embedders."),
    )
}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def pipeline_class(family: ModelFamily):
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a model's family is read from its configs")
    obj = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_prediction_type(folder: Path) -> str:
    """The scheduler's ``prediction_type`` (diffusers' schedulers default to epsilon when the key is absent)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    value = _read_json(path).get("prediction_type", EPSILON)
    if value not in PREDICTION_TYPES:
        raise ValueError(f"{path}: prediction_type = {value!r}; expected one of {list(PREDICTION_TYPES)}")
    return value


def detect_folder_family(folder: Path) -> tuple[ModelFamily, str]:
    """(family, prediction_type) of a diffusers pipeline folder, from model_index.json, unet/config.json and
    scheduler/scheduler_config.json alone."""
    folder = Path(folder)
    class_name = _read_json(folder / "model_index.json").get("_class_name")
    unet_path = folder / "unet" / "config.json"
    unet = _read_json(unet_path)
    text_time = unet.get("addition_embed_type") == "text_time"
    named_text_time = any(f.text_time_conditioning and f.pipeline_class == class_name for f in FAMILIES.values())
    if named_text_time and not text_time:
        raise ValueError(f"{folder}: model_index.json names {class_name}, but {unet_path} has addition_embed_type "
                         f"= {unet.get('addition_embed_type')!r}, not 'text_time' as that pipeline's U-Net needs")
    if text_time:
        family = next(f for f in FAMILIES.values() if f.text_time_conditioning)
    else:
        width = unet.get("cross_attention_dim")
        plain = [f for f in FAMILIES.values() if not f.text_time_conditioning]
        # A width no published model has (the embedded tiny model's 32) is the first family's: SD 1.x.
        family = next((f for f in plain if f.cross_attention_dim == width), plain[0])
    return family, read_prediction_type(folder)


class CheckpointKeys(Mapping):
    """A checkpoint's key names and tensor shapes without its weights: what ``infer_diffusers_model_type``
    reads (it only tests ``key in checkpoint`` and ``checkpoint[key].shape``)."""

    @dataclass(frozen=True)
    class _Shape:
        shape: tuple[int, ...]

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self._shapes = shapes

    @classmethod
    def read(cls, path: Path) -> CheckpointKeys:
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return cls({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        # A pickled checkpoint has no separate header: read it as from_single_file will (weights_only, and
        # memory-mapped where the file's format allows), keeping only the shapes.
        sd = load_single_file_checkpoint(str(path), local_files_only=True)
        return cls({k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")})

    def __getitem__(self, key: str) -> _Shape:
        return self._Shape(self._shapes[key])

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def detect_checkpoint_family(path: Path) -> ModelFamily:
    """The family of a single-file (original-layout) checkpoint, from its key names and shapes.

    diffusers' ``infer_diffusers_model_type`` recognises the published models by one marker key each (SDXL: the
    10th block of its OpenCLIP-G text encoder; SD 2.x: a 1024-wide cross-attention) and answers "v1" for
    anything else. So "v1" is confirmed by the layout's text-encoder prefix, which also names smaller models of
    a family (SGM's `conditioner.embedders.` is SDXL's layout, `cond_stage_model.model.` SD 2.x's OpenCLIP).
    """
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    keys = CheckpointKeys.read(path)
    model_type = infer_diffusers_model_type(keys)
    if model_type != "v1":
        for family in FAMILIES.values():
            if model_type in family.single_file_model_types:
                return family
        known = sorted(t for f in FAMILIES.values() for t in f.single_file_model_types)
        raise ValueError(f"{path}: diffusers reads this checkpoint as model type {model_type!r}; this pipeline "
                         f"trains {known} (families {sorted(FAMILIES)})")
    # Longest prefix first: SD 1.x's "cond_stage_model.transformer." and SD 2.x's "cond_stage_model.model."
    # do not overlap, but a future family's prefix might extend another's.
    for family in sorted(FAMILIES.values(), key=lambda f: -len(f.single_file_text_prefix)):
        if any(k.startswith(family.single_file_text_prefix) for k in keys):
            return family
    prefixes = [f.single_file_text_prefix for f in FAMILIES.values()]
    raise ValueError(f"{path}: no text encoder keys under any of {prefixes}; not a Stable Diffusion checkpoint "
                     f"in the original (LDM/SGM) layout")


def tokenize(tokenizers: Sequence[Any], prompts: list[str]) -> list[Any]:
    """Token ids for each tokenizer, padded to its full length, as the SD/SDXL training scripts tokenize."""
    return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in tokenizers]


def encode_sdxl_prompt(text_encoders: Sequence[Any], input_ids: Sequence[Any]):
    """(prompt_embeds, pooled_prompt_embeds) for SDXL's U-Net from each encoder's token ids.

    As ``StableDiffusionXLPipeline.encode_prompt`` (clip_skip None) and train_dreambooth_lora_sdxl.py's
    ``encode_prompt``: each encoder's penultimate hidden states (``hidden_states[-2]``), concatenated along the
    feature axis (768 + 1280 = 2048 for SDXL base); the pooled embedding is the last encoder's projected one
    (``CLIPTextModelWithProjection`` output ``[0]``, ``text_embeds``).
    """
    import torch

    if len(text_encoders) != len(input_ids):
        raise ValueError(f"{len(text_encoders)} text encoders but {len(input_ids)} token-id tensors")
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    if pooled is None or pooled.ndim != 2:
        shape = None if pooled is None else tuple(pooled.shape)
        raise ValueError(f"the last text encoder must return a pooled (batch, dim) embedding first, as "
                         f"CLIPTextModelWithProjection does; got shape {shape}")
    return torch.cat(hidden, dim=-1), pooled


def sdxl_add_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                      target_size: tuple[int, int], dtype=None):
    """SDXL's micro-conditioning for one image, shape (1, 6): the photo's size before resizing (height, width),
    the top-left corner of the crop taken from it (top, left) and the training size (height, width), in that
    order (diffusers' ``StableDiffusionXLPipeline._get_add_time_ids``; SDXL paper, section 2.2). ``dtype`` None
    keeps them integers, as train_dreambooth_lora_sdxl.py's ``compute_time_ids`` does before casting."""
    import torch

    pairs = (original_size, crop_top_left, target_size)
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"add_time_ids need three (int, int) pairs; got {pairs}")
    # operator.index accepts any integer (numpy's from a table too) and rejects floats, which would be a bug.
    return torch.tensor([[operator.index(v) for pair in pairs for v in pair]], dtype=dtype)
