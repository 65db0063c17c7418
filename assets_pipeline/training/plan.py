"""The training job for one concept and method, planned from the concept's built tables (pure: no Dagster).

The model asset (which launches the job), the nightly schedule (which asks whether the current output is still
the job's) and the asset checks (which compare an output with the rows it should list) all plan here, so the job
they launch, compare or check is one and the same, and the context a method sees is built here: for training
(:func:`train_context`) and for rendering an output (:func:`render_context`).
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

from assets_pipeline.concept import ConceptSpec
from assets_pipeline.models.resolve import BaseModelRef
from assets_pipeline.paths import project_root
from assets_pipeline.store import SPEC_SNAPSHOT, ArtifactLayout
from assets_pipeline.tables import read_asset_table
from assets_pipeline.training.config import batch_for_processes
from assets_pipeline.training.job import DatasetSource, TrainingRow, TrainJob
from assets_pipeline.training.methods import get_method
from assets_pipeline.training.methods.base import TrainContext, TrainingInputError
from assets_pipeline.training.methods.controlnet import held_out
from assets_pipeline.training.runtime.settings import Performance
from assets_pipeline.training.validation import VALIDATION_SUFFIXES, validation_inference_steps

# The model assets' code version, recorded in every output's lineage: an output trained by another one is not
# reused (training/reuse.py). Bump it when a model asset's output would change for the same job.
CODE_VERSION = "1"
VALIDATION_SEEDS = (0, 1)  # the seeds of every validation render (a real base model's)


@dataclass(frozen=True)
class Launch:
    """What the trainer resource adds to a job: where and how it runs, not what it learns (not in the identity)."""

    device: str = "auto"
    mixed_precision: str = "auto"
    performance: Performance = field(default_factory=Performance)
    log_with: str = ""
    # Data-parallel processes. Not in the identity either; it only picks the batch of a concept that sets none
    # (training/config.batch_for_processes), and that batch is in the config.
    num_processes: int = 1


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an installed wheel): recorded as null, not guessed


# The libraries whose versions decide a trained output's numbers, besides this package's own code.
LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors")


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


@cache
def source_digest() -> str:
    """sha256 over this package's Python sources (each file's path and bytes): the code that ran, also where no git
    commit is known (an installed wheel) or the checkout has uncommitted changes."""
    from assets_pipeline.hashing import digest, sha256_file

    package = Path(__file__).resolve().parents[1]
    return digest([(p.relative_to(package).as_posix(), sha256_file(p)) for p in sorted(package.rglob("*.py"))])


def code_identity() -> dict[str, object]:
    """What a trained output records of the code that trained it (``assets-pipeline reproduce`` compares it with
    the code that reproduces it): this package's version and source digest, and its numeric libraries' versions.
    The git commit is recorded beside it, when the job is planned (:func:`git_commit`)."""
    return {"package_version": _version("assets-pipeline"), "source_sha256": source_digest(),
            "libraries": {name: _version(name) for name in LIBRARIES}}


def preprocessing(layout: ArtifactLayout, specs: list[ConceptSpec]) -> dict[str, dict]:
    """How each concept's training bundle was made, per concept a job trains on (its own, then its datasets'): the
    [latents] settings, the quality filter's aspect limit (which sets the buckets) and the bundle's digest. With
    the photos' sha256 and captions this is what re-derives the bundle (``assets-pipeline reproduce``)."""
    from assets_pipeline.stages.curation import QualityConfig
    from assets_pipeline.stages.latents import LatentConfig
    from assets_pipeline.store import digest_path

    out = {}
    for spec in specs:
        recorded = digest_path(layout.asset_dir(spec.name, "vae_latents") / "latents.safetensors")
        out[spec.name] = {"latents": asdict(spec.config("latents", LatentConfig())),
                          "max_aspect_ratio": spec.config("quality", QualityConfig()).max_aspect_ratio,
                          "bundle_sha256": recorded.read_text().strip() if recorded.is_file() else None}
    return out


def training_rows(layout: ArtifactLayout, concept: str, roles: tuple[str, ...], control: bool,
                  holdout: int = 0) -> list[TrainingRow]:
    """The exact rows the trainer reads: vae_latents' index joined with where each image came from. ControlNet
    (``control``): the photos that have a conditioning image, less the ``holdout`` pairs :func:`held_out` keeps
    for validation (:func:`split_pairs`)."""
    return split_pairs(_rows(layout, concept, roles, control), holdout if control else 0)[0]


def split_pairs(rows: list[TrainingRow], holdout: int) -> tuple[list[TrainingRow], list[TrainingRow]]:
    """A ControlNet's rows split into (those it trains on, the pairs :func:`held_out` keeps for its validation,
    by photo sha256): the held-out pairs are never trained on; its validation renders follow their conditioning
    images."""
    held = set(held_out([r.image_sha256 for r in rows if r.role == "instance"], holdout))
    return ([r for r in rows if r.role != "instance" or r.image_sha256 not in held],
            sorted((r for r in rows if r.role == "instance" and r.image_sha256 in held), key=lambda r: r.image_sha256))


def _rows(layout: ArtifactLayout, concept: str, roles: tuple[str, ...], control: bool) -> list[TrainingRow]:
    index = read_asset_table(layout, concept, "vae_latents", "index.parquet")
    scores = read_asset_table(layout, concept, "clip_scored_images", "scores.parquet")
    priors = read_asset_table(layout, concept, "class_images", "class_images.parquet")
    # Where each image came from and the decisions that let it in, as they stand for this training.
    source = {r.image_sha256: {"source_path": r.source_path, "decoded_path": r.decoded_path,
                               "clip_score": float(r.clip_score), "blur_variance": float(r.blur_variance)}
              for r in scores.itertuples()}
    source.update({s: {"source_path": f"class_images/{k}", "decoded_path": d}
                   for s, k, d in zip(priors["image_sha256"], priors["cache_key"], priors["decoded_path"])})
    ctrl = control_rows(layout, concept) if control else {}
    rows = index[index["role"].isin(roles)]
    if control:  # ControlNet trains on the photos that have a conditioning image (all of them unless the
        rows = rows[(rows["role"] != "instance") | rows["image_sha256"].isin(ctrl)]  # concept allows fewer)
    # latent_key and text_key: the exact cached tensors (crop, bucket, VAE, text encoder), part of the job identity.
    return [TrainingRow(image_sha256=r.image_sha256, role=r.role, caption=r.caption, latent_key=r.latent_key,
                        text_key=r.text_key, **source[r.image_sha256],
                        **(ctrl[r.image_sha256] if control and r.role == "instance" else {}))
            for r in rows.itertuples()]


def control_rows(layout: ArtifactLayout, concept: str) -> dict[str, dict]:
    """Each photo's conditioning image (control_images' table): image sha256 -> its path and, for lineage, its
    sha256 and where it came from (tables from before those columns: None)."""
    table = read_asset_table(layout, concept, "control_images", "control.parquet")
    return {r["image_sha256"]: {"control_path": r["control_path"], "control_sha256": r.get("control_sha256"),
                                "control_source": r.get("control_source")} for r in table.to_dict("records")}


def control_paths(layout: ArtifactLayout, concept: str) -> dict[str, str]:
    """Each photo's conditioning image path (control_images' table): image sha256 -> path."""
    return {sha: r["control_path"] for sha, r in control_rows(layout, concept).items()}


def check_control_pairs(layout: ArtifactLayout, spec: ConceptSpec) -> None:
    """:class:`TrainingInputError` when the concept's own conditioning images leave photos of the quality subset
    without a pair and ``[control] require_all_pairs`` is true (the blocking check control_pairs_valid says the
    same in the asset graph): each such photo named, with why."""
    from assets_pipeline.stages.conditioning import ControlConfig

    path = layout.asset_dir(spec.name, "control_images") / "missing.parquet"
    if not spec.config("control", ControlConfig()).require_all_pairs or not path.is_file():
        return
    missing = read_asset_table(layout, spec.name, "control_images", "missing.parquet")
    if len(missing):
        shown = "; ".join(f"{r.source_path}: {r.reason}" for r in missing.head(5).itertuples())
        raise TrainingInputError(
            f"controlnet for concept {spec.name!r}: {len(missing)} photo(s) of the quality subset have no valid "
            f"conditioning image ({shown}{'; ...' if len(missing) > 5 else ''}); add them, or set [control] "
            "require_all_pairs = false to train on the photos that have one")


def dataset_source(layout: ArtifactLayout, data_root: Path, ref: BaseModelRef, concept: str, entry: dict,
                   method_name: str) -> tuple[DatasetSource, list[TrainingRow]]:
    """One ``[[<method>.datasets]]`` entry of ``concept``: the listed concept's token, class noun, latents folder
    and instance rows (with their concept and repeats), or :class:`TrainingInputError` saying why it cannot be
    trained in: not registered or built, or latents from another base model."""
    from assets_pipeline.stages.bundle import bundle_meta
    from assets_pipeline.store import CorruptFile, check_file

    other, repeats = entry["concept"], entry["repeats"]
    where = f"{concept}/concept.toml [[{method_name}.datasets]] concept = {other!r}"
    if other == concept:
        raise TrainingInputError(f"{where}: a concept cannot list itself (its own photos are always in; set "
                                 f"[{method_name}] repeats to weight them)")
    latents = layout.asset_dir(other, "vae_latents")
    if not (layout.asset_dir(other, "raw_images") / SPEC_SNAPSHOT).is_file() \
            or not (latents / "index.parquet").is_file():
        raise TrainingInputError(
            f"{where}: that concept's dataset is not built (no vae_latents output in {latents}); add its folder "
            f"under the data root ({data_root / other}) and materialize its dataset assets first")
    bundle = latents / "latents.safetensors"
    if (why := check_file(bundle)) is not None:
        raise CorruptFile(bundle, f"{why}; rematerialize vae_latents for concept {other!r} to rebuild it")
    made_with = bundle_meta(bundle).get("base_model_fingerprint")
    if made_with != ref.fingerprint:
        raise TrainingInputError(
            f"{where}: its latents were made with another base model (fingerprint {str(made_with)[:12]}, this "
            f"{method_name} trains on {ref.source!r}, fingerprint {ref.fingerprint[:12]}): give both concepts the "
            "same base model ([base_model] source in each concept.toml) and rematerialize its vae_latents")
    spec = layout.spec(other)
    rows = [replace(r, concept=other, repeats=repeats)
            for r in training_rows(layout, other, ("instance",), control=False)]
    return DatasetSource(other, spec.token, spec.class_noun, repeats, str(latents)), rows


def method_config(spec: ConceptSpec, method_name: str, n_images: int, quick: bool, launch: Launch = Launch(),
                  overrides: dict | None = None):
    """The resolved config of ``method_name`` for ``spec``'s concept: the method's defaults for ``n_images`` and
    the base model (``quick``: the embedded random one), the concept's [method] overrides, then ``overrides``;
    with several processes (``launch``), a batch they can split where neither of those sets one
    (:func:`training.config.batch_for_processes`). A batch set that cannot be split is refused at launch."""
    method = get_method(method_name)
    cfg = spec.config(method.name, method.config_cls(**method.default_config(n_images, quick=quick)))
    if overrides:
        cfg = method.config_cls(**{**asdict(cfg), **overrides})
    return replace(cfg, **batch_for_processes(cfg, {*spec.section(method.name), *(overrides or {})},
                                              launch.num_processes))


def plan_job(layout: ArtifactLayout, ref: BaseModelRef, spec: ConceptSpec, method_name: str, *, run_id: str,
             data_root: Path, launch: Launch = Launch(), scorer: dict | None = None,
             input_versions: dict | None = None, overrides: dict | None = None) -> TrainJob:
    """The trainer's job for one concept and method: resolved config (:func:`method_config`), the exact training
    rows, lineage.
    ``scorer``: the CLIP scorer's settings for validation (ClipScorerResource's model_name and pretrained)."""
    method = get_method(method_name)
    concept = spec.name
    index = read_asset_table(layout, concept, "vae_latents", "index.parquet")
    listed = spec.config(method.name, method.config_cls())  # the datasets it lists, before sizing steps
    sources = [dataset_source(layout, data_root, ref, concept, d, method.name) for d in getattr(listed, "datasets", ())]
    instances = index[index["role"] == "instance"]
    control = method.name == "controlnet"
    holdout = (overrides or {}).get("validation_holdout", getattr(listed, "validation_holdout", 0))
    if control:  # its photos: those with a conditioning image, less the pairs held out for validation
        check_control_pairs(layout, spec)
        pairs = instances[instances["image_sha256"].isin(control_paths(layout, concept))]["image_sha256"]
        instances = pairs[~pairs.isin(held_out(list(pairs), holdout))]
    n_images = len(instances) + sum(len(rows) for _, rows in sources)
    cfg = method_config(spec, method.name, n_images, ref.is_random, launch, overrides)
    rows, held = split_pairs(_rows(layout, concept, method.batch_roles(cfg), control), holdout if control else 0)
    if sources or getattr(cfg, "repeats", 1) != 1:  # each row names its concept and repeats (lineage, sampling)
        rows = [replace(r, concept=concept, repeats=cfg.repeats) for r in rows]
        rows += [r for _, dataset_rows in sources for r in dataset_rows]
    asset_dir = layout.asset_dir(concept, method.asset_name)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return TrainJob(
        concept=concept, method=method.name, config=cfg, base_model=ref,
        latents_dir=str(layout.asset_dir(concept, "vae_latents")),
        output_dir=str(asset_dir / f"{stamp}-{run_id[:8]}"),
        checkpoint_dir=str(asset_dir / ".checkpoints"),
        token=spec.token, class_noun=spec.class_noun, training_images=tuple(rows),
        lineage={"asset": method.asset_name, "code_version": CODE_VERSION, "run_id": run_id,
                 "git_commit": git_commit(), "input_data_versions": input_versions or {}, "created_at": stamp,
                 "preprocessing": preprocessing(layout, [spec, *(layout.spec(s.concept) for s, _ in sources)])},
        scorer={**(scorer or {"model_name": "embedded", "pretrained": None}), "artifact_root": str(layout.root)},
        device=launch.device, mixed_precision=launch.mixed_precision, performance=launch.performance,
        cache_dir=str(layout.cache_root()), log_with=launch.log_with,
        datasets=tuple(source for source, _ in sources),
        validation_pairs=tuple(held),
        # The embedded random model's images mean nothing: fewer, cheaper validation renders. Any other model's
        # validation costs in proportion to its training (validation.validation_inference_steps).
        validation_inference_steps=4 if ref.is_random else validation_inference_steps(
            cfg.total_steps(n_images) * cfg.train_batch_size * cfg.gradient_accumulation_steps
            * len(method.batch_roles(cfg)),
            (1 + len(sources)) * len(VALIDATION_SUFFIXES) * len(VALIDATION_SEEDS)),
        validation_seeds=(0,) if ref.is_random else VALIDATION_SEEDS,
    )


def train_context(job: TrainJob) -> TrainContext:
    """What the job's method sees of its concept and data."""
    rows = job.training_images
    return TrainContext(
        concept=job.concept, token=job.token, class_noun=job.class_noun,
        resolution=job.base_model.resolution, family=job.base_model.family,
        num_instance_images=sum(r.role == "instance" for r in rows),
        num_class_images=sum(r.role == "class" for r in rows),
        num_control_images=sum(bool(r.control_path) for r in rows if r.role == "instance"),
        # ControlNet: validation follows the held-out pairs' conditioning images, or the training pairs' if none
        extra={"control_paths": [r.control_path for r in job.validation_pairs or rows if r.control_path],
               # the other concepts trained in: their tokens and class nouns give validation prompts of their own
               "datasets": [{"concept": d.concept, "token": d.token, "class_noun": d.class_noun}
                            for d in job.datasets]},
    )


def render_context(layout: ArtifactLayout, spec: ConceptSpec, base_model: dict, control: bool,
                   holdout: int = 0) -> TrainContext:
    """What rendering an output needs of its concept (the changes_base_output check): prompts, size and family
    from the output's manifest (``base_model``), and the concept's conditioning images now (a ControlNet's
    held-out pairs' where it has them, as its validation). It counts no training rows: the check's cached result
    is keyed by it."""
    trained, held = split_pairs(_rows(layout, spec.name, ("instance",), True), holdout) if control else ([], [])
    controls = [r.control_path for r in held or trained]
    return TrainContext(concept=spec.name, token=spec.token, class_noun=spec.class_noun,
                        resolution=base_model["resolution"], num_instance_images=0,
                        family=base_model.get("family", "sd1"), extra={"control_paths": controls})
