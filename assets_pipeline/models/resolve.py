"""A configured base model resolved: where it is, what family it is, and the fingerprint every downstream
cache key includes.

Sources: ``embedded`` / ``embedded-sdxl`` (the tiny random-weight models, built offline on first use:
``models/embedded.py``), a local diffusers folder, a single-file checkpoint (A1111/ComfyUI layout, with an
optional folder holding its configs), or a hub id already in the local hub cache. The family and prediction type
are read from the configs (``models/detect.py``) without loading weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assets_pipeline.concept import config_section
from assets_pipeline.hashing import digest, sha256_file
from assets_pipeline.models.detect import detect_checkpoint_family, detect_folder_family
from assets_pipeline.models.embedded import EMBEDDED_MODELS, RESOLUTION, ensure_embedded
from assets_pipeline.models.families import ModelFamily, get_family
from assets_pipeline.store import write_json_atomic

# The deployment's default base model (any value `BaseModelResource.source` takes); explicit config wins.
BASE_MODEL_ENV = "ASSETS_PIPELINE_BASE_MODEL"
# Config keys that record library versions or load paths, not model content: left out of fingerprints so the
# same weights and architecture always have the same fingerprint. (transformers writes how a tokenizer was loaded,
# e.g. is_local / local_files_only, into the tokenizer_config.json of a re-saved pipeline.)
_VOLATILE_KEYS = {
    "_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash",
    "name_or_path", "is_local", "local_files_only", "tokenizer_file", "special_tokens_map_file",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


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
    family: str  # a key of models.families.FAMILIES: "sd1" | "sd2" | "sdxl" | "sd3" | "flux"
    prediction_type: str  # the scheduler's: "epsilon" | "v_prediction" | "sample"; "flow" (flow matching)
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


@config_section("base_model")
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


def check_source(source: str, single_file_config: str | None = None) -> None:
    """Refuse a base model ``source`` that :func:`resolve_base_model` could never resolve, without resolving it
    (nothing is built, read or downloaded): a path that does not exist, a folder that is not a diffusers pipeline,
    a checkpoint that is not a file, a ``single_file_config`` that is not a folder. A ValueError says which and
    what is expected. Hub ids ('org/name') are left to the resolution (the hub cache is read then)."""
    if not source or source in EMBEDDED_MODELS:
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"source = {source!r} is a folder but not a diffusers pipeline (no model_index.json): "
                             "point it at a saved pipeline folder (save_pretrained) or a checkpoint file")
    elif path.suffix in _WEIGHT_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"source = {source!r}: single-file checkpoint {path} does not exist")
    elif source.count("/") != 1 or path.is_absolute() or source.startswith((".", "~")) or path.exists():
        raise ValueError(
            f"source = {source!r} does not exist: expected one of {sorted(EMBEDDED_MODELS)}, a diffusers folder, a "
            f"checkpoint file ({', '.join(_WEIGHT_SUFFIXES)}) or a hub id 'org/name'")
    if single_file_config is not None:
        config = Path(single_file_config).expanduser()
        if not (config / "model_index.json").is_file():
            raise ValueError(f"single_file_config = {single_file_config!r} is not a diffusers folder (no "
                             f"model_index.json in {config})")


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

    if source in EMBEDDED_MODELS:
        return from_folder("embedded", ensure_embedded(artifact_root / "base_models", source),
                           RESOLUTION[EMBEDDED_MODELS[source][1]])
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
        f"base model {source!r} is neither one of {sorted(EMBEDDED_MODELS)}, a diffusers folder, a checkpoint "
        f"file ({', '.join(_WEIGHT_SUFFIXES)}) nor a hub id 'org/name'"
    )


def component_fingerprint(ref: BaseModelRef, component: str, artifact_root: Path) -> str:
    """Fingerprint of one component (``vae``, ``text_encoder`` + ``tokenizer``, ...), so e.g. fine-tuning the
    U-Net of a base model does not invalidate cached VAE latents."""
    if ref.kind == "single_file":
        return digest(ref.fingerprint, component)
    memo = artifact_root / "base_models" / ".fingerprints"
    return digest(component, cached_fingerprint(Path(ref.location) / component, memo))
