"""A base model's family and prediction type, read from configuration only (a diffusers folder's JSON files, a
single-file checkpoint's key names and shapes), never from weights."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assets_pipeline.models.families import FAMILIES, ModelFamily
from assets_pipeline.models.unet import EPSILON, PREDICTION_TYPES


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
    """(family, prediction_type) of a diffusers pipeline folder, from model_index.json, the denoiser's config
    (unet/ or transformer/) and scheduler/scheduler_config.json alone."""
    folder = Path(folder)
    class_name = _read_json(folder / "model_index.json").get("_class_name")
    unet_path = folder / "unet" / "config.json"
    if not unet_path.is_file() and (folder / "transformer").is_dir():
        return _transformer_family(folder, class_name)
    unet = _read_json(unet_path)
    u_nets = [f for f in FAMILIES.values() if f.denoiser.component == "unet"]
    # SDXL's U-Net config says addition_embed_type = "text_time": it takes the micro-conditioning.
    micro = unet.get("addition_embed_type") == "text_time"
    named_micro = any(f.micro_conditioning and f.pipeline_class == class_name for f in u_nets)
    if named_micro and not micro:
        raise ValueError(f"{folder}: model_index.json names {class_name}, but {unet_path} has addition_embed_type "
                         f"= {unet.get('addition_embed_type')!r}, not 'text_time' as that pipeline's U-Net needs")
    candidates = [f for f in u_nets if f.micro_conditioning == micro]
    # Families with the same conditioning differ in their text encoders' width (SD 1.x: 768, SD 2.x: 1024); a
    # width no published model has (the embedded tiny model's 32) is the first such family's: SD 1.x.
    width = unet.get("cross_attention_dim")
    family = next((f for f in candidates if f.cross_attention_dim == width), candidates[0])
    return family, read_prediction_type(folder)


def _transformer_family(folder: Path, class_name: str | None) -> tuple[ModelFamily, str]:
    """A flow-matching family's folder: its transformer's class (transformer/config.json) names the family, and the
    pipeline class model_index.json names must agree; such a model predicts the flow (no prediction_type)."""
    path = folder / "transformer" / "config.json"
    transformer = _read_json(path).get("_class_name")
    family = next((f for f in FAMILIES.values() if f.denoiser.model_class == transformer), None)
    if family is None:
        known = sorted(f.denoiser.model_class for f in FAMILIES.values() if f.denoiser.component == "transformer")
        raise ValueError(f"{path}: a transformer of class {transformer!r}; the families trained here have {known}")
    named = [f for f in FAMILIES.values() if f.pipeline_class == class_name]
    if named and family not in named:
        raise ValueError(f"{folder}: model_index.json names {class_name}, but {path} is a {transformer} "
                         f"({family.pipeline_class}'s transformer)")
    _read_json(folder / "scheduler" / "scheduler_config.json")  # present, as every pipeline folder's is
    return family, family.default_prediction_type


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
    for family in sorted(FAMILIES.values(), key=lambda f: -len(f.single_file_prefix)):
        if any(k.startswith(family.single_file_prefix) for k in keys):
            return family
    prefixes = [f.single_file_prefix for f in FAMILIES.values()]
    raise ValueError(f"{path}: no text encoder keys or transformer blocks under any of {prefixes}; not a Stable "
                     f"Diffusion or Flux checkpoint in an original (LDM/SGM/BFL) layout")
