"""Trained outputs: one asset per registered method (lora_adapter, dreambooth_model,
textual_inversion_embedding, controlnet_model), each trained in its own process through Dagster Pipes,
each with asset checks. A concept builds only the methods its concept.toml requests; for the others the
asset is skipped (not materialized, not failed)."""

import json
import subprocess
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from assets_pipeline.assets.common import (
    clean_stale_temporaries, read_upstream, restore_images, spec_from_snapshot,
)
from assets_pipeline.assets.dataset import clip_scored_images, control_images, raw_images
from assets_pipeline.assets.latents import vae_latents
from assets_pipeline.assets.priors import class_images
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.paths import project_root
from assets_pipeline.store import write_json_atomic
from assets_pipeline.retention import human_bytes, prune_asset
from assets_pipeline.resources import BaseModelResource, ClipScorerResource, PipelineStorage, TrainerLauncher
from assets_pipeline.training.methods import get_method, method_names
from assets_pipeline.training.reuse import (
    FORCE_RETRAIN_TAG, find_reusable, force_requested, output_views, reuse_metadata,
)
from assets_pipeline.training.validation import VALIDATION_SUFFIXES, step_views, validation_inference_steps

CODE_VERSION = "1"
CURRENT = "current.json"  # {"path": <version folder name>}: the asset's current output among kept versions
INPUT_ASSETS = (raw_images, clip_scored_images, class_images, control_images, vae_latents)
DATASET_INPUTS = (raw_images, clip_scored_images, vae_latents)  # what a concept trained in as a dataset gives
VALIDATION_SEEDS = (0, 1)  # the seeds of every validation render (a real base model's)
VIEW_KINDS = {"md": dg.MetadataValue.md, "path": dg.MetadataValue.path, "int": dg.MetadataValue.int,
              "float": dg.MetadataValue.float}  # the kinds of step_views' (kind, value) pairs


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an installed wheel): recorded as null, not guessed


def current_output(storage: PipelineStorage, concept: str, asset_name: str) -> Path | None:
    pointer = storage.layout().asset_dir(concept, asset_name) / CURRENT
    # Relative to the pointer's folder (an absolute path, written by an older version, is kept as is).
    return pointer.parent / json.loads(pointer.read_text())["path"] if pointer.is_file() else None


def _input_versions(context: dg.AssetExecutionContext, concept: str, datasets: tuple[str, ...] = ()) -> dict:
    """The data versions of the inputs: this concept's, and the dataset assets of each concept it trains in
    (``<asset>[<concept>]``)."""
    versions = {}
    for c in (concept, *datasets):
        for a in INPUT_ASSETS if c == concept else DATASET_INPUTS:
            rec = context.instance.get_latest_data_version_record(a.key, partition_key=c)
            mat = rec.asset_materialization if rec else None
            key = a.key.to_user_string() + ("" if c == concept else f"[{c}]")
            versions[key] = mat.tags.get("dagster/data_version") if mat and mat.tags else None
    return versions


def training_rows(storage: PipelineStorage, concept: str, roles: tuple[str, ...], control: bool) -> list[dict]:
    """The exact rows the trainer reads: vae_latents' index joined with where each image came from."""
    index = read_upstream(storage, concept, "vae_latents", "index.parquet")
    scores = read_upstream(storage, concept, "clip_scored_images", "scores.parquet")
    priors = read_upstream(storage, concept, "class_images", "class_images.parquet")
    # Where each image came from and the decisions that let it in, as they stand for this training.
    source = {r.image_sha256: {"source_path": r.source_path, "decoded_path": r.decoded_path,
                               "clip_score": float(r.clip_score), "blur_variance": float(r.blur_variance)}
              for r in scores.itertuples()}
    source.update({s: {"source_path": f"class_images/{k}", "decoded_path": d}
                   for s, k, d in zip(priors["image_sha256"], priors["cache_key"], priors["decoded_path"])})
    ctrl = {}
    if control:
        table = read_upstream(storage, concept, "control_images", "control.parquet")
        ctrl = dict(zip(table["image_sha256"], table["control_path"]))
    rows = []
    for r in index[index["role"].isin(roles)].itertuples():
        # latent_key and text_key: the exact cached tensors (crop, bucket, VAE, text encoder), part of the job identity.
        row = {"image_sha256": r.image_sha256, "role": r.role, "caption": r.caption, "latent_key": r.latent_key,
               "text_key": r.text_key, **source[r.image_sha256]}
        if control and r.role == "instance":
            row["control_path"] = ctrl.get(r.image_sha256)
        rows.append(row)
    return rows


def dataset_source(storage: PipelineStorage, ref, concept: str, entry: dict, method_name: str) -> dict:
    """One ``[[<method>.datasets]]`` entry of ``concept``: the listed concept's token, class noun, latents folder
    and instance rows (with their concept and repeats), or :class:`TrainingInputError` saying why it cannot be
    trained in: not registered or built, or latents from another base model."""
    from assets_pipeline.assets.common import spec_from_snapshot
    from assets_pipeline.stages.latents import bundle_meta
    from assets_pipeline.store import CorruptFile, check_file
    from assets_pipeline.training.methods.base import TrainingInputError

    other, repeats = entry["concept"], entry["repeats"]
    where = f"{concept}/concept.toml [[{method_name}.datasets]] concept = {other!r}"
    if other == concept:
        raise TrainingInputError(f"{where}: a concept cannot list itself (its own photos are always in; set "
                                 f"[{method_name}] repeats to weight them)")
    layout = storage.layout()
    latents = layout.asset_dir(other, "vae_latents")
    if not (layout.asset_dir(other, "raw_images") / "concept.json").is_file() \
            or not (latents / "index.parquet").is_file():
        raise TrainingInputError(
            f"{where}: that concept's dataset is not built (no vae_latents output in {latents}); add its folder "
            f"under the data root ({storage.data_path() / other}) and materialize its dataset assets first")
    bundle = latents / "latents.safetensors"
    if (why := check_file(bundle)) is not None:
        raise CorruptFile(bundle, f"{why}; rematerialize vae_latents for concept {other!r} to rebuild it")
    made_with = bundle_meta(bundle).get("base_model_fingerprint")
    if made_with != ref.fingerprint:
        raise TrainingInputError(
            f"{where}: its latents were made with another base model (fingerprint {str(made_with)[:12]}, this "
            f"{method_name} trains on {ref.source!r}, fingerprint {ref.fingerprint[:12]}): give both concepts the "
            "same base model ([base_model] source in each concept.toml) and rematerialize its vae_latents")
    spec = spec_from_snapshot(storage, other)
    rows = [{**r, "concept": other, "repeats": repeats}
            for r in training_rows(storage, other, ("instance",), control=False)]
    return {"concept": other, "token": spec.token, "class_noun": spec.class_noun, "repeats": repeats,
            "latents_dir": str(latents), "rows": rows}


def build_train_job(storage: PipelineStorage, ref, spec, method_name: str, run_id: str, input_versions: dict,
                    trainer: TrainerLauncher, clip_scorer: ClipScorerResource, overrides: dict | None = None):
    """The trainer's job for one concept and method: resolved config (method defaults for this dataset size and
    base model, then the concept's [method] overrides, then ``overrides``), the exact training rows, lineage."""
    from dataclasses import asdict

    from assets_pipeline.assets.common import concept_config
    from assets_pipeline.training.job import TrainJob

    method = get_method(method_name)
    concept = spec.name
    layout = storage.layout()
    index = read_upstream(storage, concept, "vae_latents", "index.parquet")
    listed = concept_config(spec, method.name, method.config_cls())  # the datasets it lists, before sizing steps
    datasets = [dataset_source(storage, ref, concept, d, method.name) for d in getattr(listed, "datasets", ())]
    n_images = int((index["role"] == "instance").sum()) + sum(len(d["rows"]) for d in datasets)
    default = method.config_cls(**method.default_config(n_images, quick=ref.is_random))
    cfg = concept_config(spec, method.name, default)
    if overrides:
        cfg = method.config_cls(**{**asdict(cfg), **overrides})
    rows = training_rows(storage, concept, method.batch_roles(cfg), control=method.name == "controlnet")
    if datasets or getattr(cfg, "repeats", 1) != 1:  # each row names its concept and repeats (lineage, sampling)
        rows = [{**r, "concept": concept, "repeats": cfg.repeats} for r in rows]
        rows += [r for d in datasets for r in d.pop("rows")]
    asset_dir = layout.asset_dir(concept, method.asset_name)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return TrainJob(
        concept=concept, method=method.name, config=asdict(cfg), base_model=asdict(ref),
        latents_dir=str(layout.asset_dir(concept, "vae_latents")),
        output_dir=str(asset_dir / f"{stamp}-{run_id[:8]}"),
        checkpoint_dir=str(asset_dir / ".checkpoints"),
        token=spec.token, class_noun=spec.class_noun, training_images=rows,
        lineage={"asset": method.asset_name, "code_version": CODE_VERSION, "run_id": run_id,
                 "git_commit": git_commit(), "input_data_versions": input_versions, "created_at": stamp},
        scorer={"model_name": clip_scorer.model_name, "pretrained": clip_scorer.pretrained,
                "artifact_root": str(layout.root)},
        device=trainer.device, mixed_precision=trainer.mixed_precision,
        performance=trainer.performance_settings(), cache_dir=str(layout.root / "cache"),
        log_with=trainer.tracker(), datasets=datasets,
        # The embedded random model's images mean nothing: fewer, cheaper validation renders. Any other model's
        # validation costs in proportion to its training (validation.validation_inference_steps).
        validation_inference_steps=4 if ref.is_random else validation_inference_steps(
            cfg.total_steps(n_images) * cfg.train_batch_size * cfg.gradient_accumulation_steps
            * len(method.batch_roles(cfg)),
            (1 + len(datasets)) * len(VALIDATION_SUFFIXES) * len(VALIDATION_SEEDS)),
        validation_seeds=(0,) if ref.is_random else VALIDATION_SEEDS,
    )


def datasets_table(job) -> str:
    """The concepts a job trains on, as markdown: token, class noun, photos and repeats of each."""
    photos = {}
    for r in job.training_images:
        if r["role"] == "instance":
            photos[job.row_source(r)] = photos.get(job.row_source(r), 0) + 1
    lines = ["| concept | token | class noun | photos | repeats |", "|---|---|---|---|---|"]
    for d in [{"concept": job.concept, "token": job.token, "class_noun": job.class_noun,
               "repeats": next((k[1] for k in photos if k[0] == job.concept), 1)}, *job.datasets]:
        lines.append(f"| {d['concept']} | {d['token']} | {d['class_noun']} | "
                     f"{photos.get((d['concept'], d['repeats']), 0)} | {d['repeats']} |")
    return "\n".join(lines)


def check_training_inputs(context: dg.AssetExecutionContext, storage: PipelineStorage, job) -> None:
    """Before a GPU is claimed: the photos validation compares against are restored if damaged, and the latents
    bundle and control images must be intact (:class:`CorruptFile` names the file and the asset that rebuilds it)."""
    import pandas as pd

    from assets_pipeline.store import CorruptFile, check_file

    for concept in job.latents_dirs():  # this concept's photos, and those of the concepts it trains in
        photos = pd.DataFrame([r for r in job.training_images
                               if r["role"] == "instance" and job.row_source(r)[0] == concept],
                              columns=["image_sha256", "source_path", "decoded_path"])
        restore_images(context, storage, concept, photos)
    needed = [(Path(d) / "latents.safetensors", "vae_latents") for d in job.latents_dirs().values()]
    needed += [(Path(r["control_path"]), "control_images") for r in job.training_images if r.get("control_path")]
    for path, asset in needed:
        if (why := check_file(path)) is not None:
            owner = path.parent.parent.name if asset == "vae_latents" else job.concept
            raise CorruptFile(path, f"{why}; rematerialize {asset} for concept {owner!r} to rebuild it")


def build_model_asset(method_name: str) -> dg.AssetsDefinition:
    method = get_method(method_name)
    deps = [vae_latents, clip_scored_images, class_images] + ([control_images] if method_name == "controlnet" else [])

    @dg.asset(name=method.asset_name, partitions_def=concepts_partitions, group_name="models",
              code_version=CODE_VERSION, deps=deps, pool="gpu", output_required=False,
              kinds={"pytorch", "diffusers"}, description=(method.__doc__ or method.name))
    def _model(context: dg.AssetExecutionContext, storage: PipelineStorage, base_model: BaseModelResource,
               clip_scorer: ClipScorerResource, trainer: TrainerLauncher):
        from assets_pipeline.training.loop import train_context

        concept = context.partition_key
        spec = spec_from_snapshot(storage, concept)
        if method.name not in spec.methods:
            context.log.info(f"{method.name} is not requested by concept {concept!r} (methods = {list(spec.methods)})")
            return
        job = build_train_job(
            storage, base_model.resolve(storage.layout().root, spec), spec, method.name, run_id=context.run_id,
            input_versions={}, trainer=trainer, clip_scorer=clip_scorer)
        job = replace(job, lineage={**job.lineage, "input_data_versions": _input_versions(
            context, concept, tuple(d["concept"] for d in job.datasets))})
        # The resolved config (e.g. LoRA's variant and ranks) beside the trainer's numbers, trained or reused.
        context.add_asset_metadata({"method_config": dg.MetadataValue.json(job.config)})
        if job.datasets:
            context.add_asset_metadata({"datasets": dg.MetadataValue.md(datasets_table(job))})
        previous = current_output(storage, concept, method.asset_name)
        reuse, why = find_reusable(previous, job, CODE_VERSION)
        if force_requested(context.run_tags):
            context.log.info(f"{FORCE_RETRAIN_TAG}=true: training although {why}")
        elif reuse is not None:
            context.log.info(f"reusing {reuse.path}: {why}; no training (tag {FORCE_RETRAIN_TAG}=true forces one)")
            views = {k: dg.MetadataValue.md(v) if t == "md" else dg.MetadataValue.path(v)
                     for k, (t, v) in output_views(reuse.path).items()}
            # validation_steps: the same strips per step and chosen step the training reported
            views.update({k: VIEW_KINDS[t](v) for k, (t, v) in step_views(reuse.path).items()})
            yield dg.MaterializeResult(data_version=dg.DataVersion(reuse.data_version),
                                       metadata={**views, **reuse_metadata(reuse)})
            return
        else:
            context.log.info(f"training: {why}")
        check_training_inputs(context, storage, job)
        cfg = method.config_cls(**job.config)
        method.check_inputs(train_context(job), cfg)  # refuse here, with the reason, before launching a process
        asset_dir = Path(job.output_dir).parent
        asset_dir.mkdir(parents=True, exist_ok=True)
        # The trainer's base renders and the checks' results are cache kinds its training and checks write.
        clean_stale_temporaries(context, storage, concept, method.asset_name, caches=("base_renders", "check_results"))
        job_path = asset_dir / f".job-{context.run_id}.json"
        job.save(job_path)
        yield from trainer.launch(context, job_path).get_results()
        # The version folder's name, relative to this folder: the artifact root can move.
        write_json_atomic(asset_dir / CURRENT, {"path": Path(job.output_dir).name, "run_id": context.run_id})
        for p in prune_asset(asset_dir, Path(job.output_dir), storage.keep_weight_versions):
            context.log.info(f"pruned the weights of {p.folder.name} ({human_bytes(p.bytes)}; newest "
                             f"{storage.keep_weight_versions} kept): its lineage, metrics and validation images stay")
        # A concurrent run of this asset removes a job file quiet for an hour (cleanup.GRACE_S); the trainer
        # read it at its start, so only this unlink notices.
        job_path.unlink(missing_ok=True)

    return _model


MODEL_ASSETS = [build_model_asset(name) for name in method_names()]
