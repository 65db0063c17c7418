"""A training job: everything the trainer process needs, as one JSON file (the asset writes it, the CLI reads
it), so the same trainer runs under Dagster Pipes, from a shell, or on a cluster."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from assets_pipeline.hashing import digest


@dataclass(frozen=True)
class TrainJob:
    concept: str
    method: str
    config: dict[str, Any]  # the method's config fields, defaults and overrides resolved
    base_model: dict[str, Any]  # BaseModelRef fields
    latents_dir: str  # the vae_latents output folder (latents.safetensors + index.parquet)
    output_dir: str  # final output folder; written to a temporary sibling and renamed at the end
    checkpoint_dir: str  # resumable checkpoints of this exact job live here
    token: str
    class_noun: str
    # sha256, role, caption, source_path, decoded_path (+ control_path); with datasets also the concept each row
    # comes from and its repeats (rows without them are this job's concept's, seen once per epoch)
    training_images: list[dict[str, Any]]
    lineage: dict[str, Any]  # data versions, code version, run id, git commit, ...
    scorer: dict[str, Any] = field(default_factory=dict)  # ClipScorerResource settings for CLIP-T / CLIP-I
    device: str = "auto"
    mixed_precision: str = "auto"
    validation_inference_steps: int = 30  # denoising steps of each validation render
    validation_seeds: tuple[int, ...] = (0, 1)
    # How to run, not what to learn (not in the identity): speed settings and where compiled kernels and
    # micro-batch probes are cached.
    performance: dict[str, Any] = field(default_factory=dict)
    cache_dir: str = ""
    log_with: str = ""  # an accelerate tracker ("tensorboard"), or none
    # The other concepts trained in (LoRA's [[lora.datasets]]): {concept, token, class_noun, repeats, latents_dir}
    datasets: list[dict[str, Any]] = field(default_factory=list)

    def identity(self) -> str:
        """What determines the trained weights: checkpoints from a job with another identity are never resumed."""
        # Control images and latents are content-addressed: a control image's file name is its cache key (annotator
        # settings included), a latent's key covers its crop, bucket and VAE, a text embedding's its encoder.
        # A row's concept and repeats enter only where they are not (this concept, 1): the identity of a job
        # without datasets is the one it always had.
        return digest(self.method, self.config, self.base_model["fingerprint"],
                      [(r["image_sha256"], r["role"], r["caption"], Path(r.get("control_path") or "").name,
                        r.get("latent_key"), r.get("text_key"))
                       + (() if self.row_source(r) == (self.concept, 1) else self.row_source(r))
                       for r in self.training_images])

    def row_source(self, row: dict[str, Any]) -> tuple[str, int]:
        """(the concept a training row comes from, its repeats per epoch)."""
        return row.get("concept", self.concept), int(row.get("repeats", 1))

    def latents_dirs(self) -> dict[str, str]:
        """Each concept's vae_latents folder the rows come from: this concept's, then its datasets'."""
        return {self.concept: self.latents_dir, **{d["concept"]: d["latents_dir"] for d in self.datasets}}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> TrainJob:
        raw = json.loads(Path(path).read_text())
        raw["validation_seeds"] = tuple(raw.get("validation_seeds", (0, 1)))
        return cls(**raw)
