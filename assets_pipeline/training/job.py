"""A training job: everything the trainer process needs, as typed records written to one JSON file (the model
asset writes it, the trainer CLI reads it), so the same trainer runs under Dagster Pipes, from a shell, or on a
cluster. ``training/plan.py`` makes jobs; nothing else does.

The file carries a format version: a trainer refuses a job file of another format with a message that says how
to get a new one, rather than failing later on a missing or renamed key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from assets_pipeline.hashing import digest
from assets_pipeline.models.resolve import BaseModelRef
from assets_pipeline.training.config import TrainConfig, identity_config
from assets_pipeline.training.runtime.settings import Performance

# Bump when a field's meaning or the file's layout changes. 1: d663daf and before (no version in the file).
JOB_FORMAT = 2


@dataclass(frozen=True)
class TrainingRow:
    """One row the trainer reads: a photo (``instance``) or class image (``class``) of the vae_latents bundle,
    with its caption, the cached tensors it trains on and where it came from (for lineage)."""

    image_sha256: str
    role: str  # "instance" | "class"
    caption: str
    latent_key: str | None  # the exact cached latent (crop, bucket, VAE) and text embedding (text encoder)
    text_key: str | None
    source_path: str  # the photo's path under the data root, or class_images/<cache key>
    decoded_path: str  # the decoded image the dataset assets made (validation's CLIP-I compares with it)
    clip_score: float | None = None  # the decisions that let a photo in (instance rows)
    blur_variance: float | None = None
    control_path: str | None = None  # ControlNet: the conditioning image (instance rows)
    # ControlNet, for lineage: the conditioning image's own sha256 (the user's file, or the annotator's image), and
    # where it came from: its path in the concept folder (control/...), or "annotator <name> <parameters>"
    control_sha256: str | None = None
    control_source: str | None = None
    # With datasets or repeats (LoRA's [[lora.datasets]], [lora] repeats): the concept the row comes from and how
    # often it is drawn per epoch. None on a job without them: such a row is its job's concept's, seen once.
    concept: str | None = None
    repeats: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The row's fields, without the optional ones it does not have (as the job files always were)."""
        optional = {f.name for f in fields(self) if f.default is None}
        return {k: v for k, v in asdict(self).items() if v is not None or k not in optional}


@dataclass(frozen=True)
class DatasetSource:
    """Another concept trained into this job (LoRA's ``[[lora.datasets]]``)."""

    concept: str
    token: str
    class_noun: str
    repeats: int
    latents_dir: str  # its vae_latents folder


@dataclass(frozen=True)
class TrainJob:
    concept: str
    method: str
    config: TrainConfig  # the method's config (its config_cls): defaults, the concept's overrides, resolved
    base_model: BaseModelRef
    latents_dir: str  # the vae_latents output folder (latents.safetensors + index.parquet)
    output_dir: str  # final output folder; written to a temporary sibling and renamed at the end
    checkpoint_dir: str  # resumable checkpoints of this exact job live here
    token: str
    class_noun: str
    training_images: tuple[TrainingRow, ...]
    lineage: dict[str, Any]  # data versions, code version, run id, git commit, ...
    scorer: dict[str, Any] = field(default_factory=dict)  # ClipScorerResource settings for CLIP-T / CLIP-I
    device: str = "auto"
    mixed_precision: str = "auto"
    validation_inference_steps: int = 30  # denoising steps of each validation render
    validation_seeds: tuple[int, ...] = (0, 1)
    # How to run, not what to learn (not in the identity): speed settings and where compiled kernels and
    # micro-batch probes are cached.
    performance: Performance = field(default_factory=Performance)
    cache_dir: str = ""
    log_with: str = ""  # an accelerate tracker ("tensorboard"), or none
    datasets: tuple[DatasetSource, ...] = ()
    # ControlNet: pairs held out of training; validation renders follow their conditioning images. Not in the
    # identity (the weights do not depend on them); listed in the manifest.
    validation_pairs: tuple[TrainingRow, ...] = ()

    def identity(self) -> str:
        """What determines the trained weights: checkpoints from a job with another identity are never resumed,
        and an output trained from the same identity is reused (training/reuse.py)."""
        # Control images and latents are content-addressed: a control image's file name is its cache key (annotator
        # settings included), a latent's key covers its crop, bucket and VAE, a text embedding's its encoder.
        # A row's concept and repeats enter only where they are not (this concept, 1): the identity of a job
        # without datasets is the one it always had.
        return digest(self.method, identity_config(self.config), self.base_model.fingerprint,
                      [(r.image_sha256, r.role, r.caption, Path(r.control_path or "").name, r.latent_key, r.text_key)
                       + (() if self.row_source(r) == (self.concept, 1) else self.row_source(r))
                       for r in self.training_images])

    def row_source(self, row: TrainingRow) -> tuple[str, int]:
        """(the concept a training row comes from, its repeats per epoch)."""
        return row.concept or self.concept, row.repeats or 1

    def latents_dirs(self) -> dict[str, str]:
        """Each concept's vae_latents folder the rows come from: this concept's, then its datasets'."""
        return {self.concept: self.latents_dir, **{d.concept: d.latents_dir for d in self.datasets}}

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(format_version=JOB_FORMAT, config=asdict(self.config), base_model=asdict(self.base_model),
                   training_images=[r.to_json() for r in self.training_images],
                   validation_pairs=[r.to_json() for r in self.validation_pairs],
                   performance=self.performance.to_dict(), datasets=[asdict(d) for d in self.datasets])
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: str = "job") -> TrainJob:
        from assets_pipeline.training.methods import get_method

        version = raw.get("format_version", 1)
        if version != JOB_FORMAT:
            raise ValueError(
                f"{where}: job format version {version}, and this trainer reads version {JOB_FORMAT}: the job file "
                "was written by another version of assets_pipeline. Materialize the model asset again with this "
                "version (it writes a new job file), or run the trainer of the version that wrote it")
        raw = {k: v for k, v in raw.items() if k != "format_version"}
        return cls(**{
            **raw,
            "config": get_method(raw["method"]).config_cls(**raw["config"]),
            "base_model": BaseModelRef(**raw["base_model"]),
            "training_images": tuple(TrainingRow(**r) for r in raw["training_images"]),
            "validation_pairs": tuple(TrainingRow(**r) for r in raw.get("validation_pairs", ())),
            "validation_seeds": tuple(raw.get("validation_seeds", (0, 1))),
            "performance": Performance.from_dict(raw.get("performance")),
            "datasets": tuple(DatasetSource(**d) for d in raw.get("datasets", ())),
        })

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> TrainJob:
        return cls.from_json(json.loads(Path(path).read_text()), where=str(path))
