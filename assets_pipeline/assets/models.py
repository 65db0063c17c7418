"""Trained outputs: one asset per registered method (lora_adapter, dreambooth_model,
textual_inversion_embedding, controlnet_model), each trained in its own process through Dagster Pipes,
each with asset checks. A concept builds only the methods its concept.toml requests; for the others the
asset is skipped (not materialized, not failed)."""

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import dagster as dg

from assets_pipeline.assets.common import (
    clean_stale_temporaries, latest_data_version, restore_images, spec_from_snapshot,
)
from assets_pipeline.assets.dataset import clip_scored_images, control_images, raw_images
from assets_pipeline.assets.latents import vae_latents
from assets_pipeline.assets.priors import class_images
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.retention import human_bytes, prune_asset
from assets_pipeline.resources import BaseModelResource, ClipScorerResource, PipelineStorage, TrainerLauncher
from assets_pipeline.resources.run_watch import ensure_run_active
from assets_pipeline.store import UnreadableFile, write_json_atomic
from assets_pipeline.training.checkpoints import lock_holder, lock_path
from assets_pipeline.training.methods import get_method, method_names
from assets_pipeline.training.plan import CODE_VERSION, plan_job, train_context
from assets_pipeline.training.reuse import (
    CURRENT, FORCE_RETRAIN_TAG, current_output, find_reusable, find_reusable_version, force_requested, output_views,
    reuse_metadata,
)
from assets_pipeline.training.validation import step_views

INPUT_ASSETS = (raw_images, clip_scored_images, class_images, control_images, vae_latents)
DATASET_INPUTS = (raw_images, clip_scored_images, vae_latents)  # what a concept trained in as a dataset gives
# A second run of a job another run is training gives its gpu slot back and retries (Dagster frees a step's pool
# slot while it waits to retry), then reuses the first's output: waits of 10, 20, 40, 60, 60 ... s, ~16 h in all.
LOCK_RETRY_S, LOCK_RETRY_MAX_S, LOCK_RETRIES = 10, 60, 1000
VIEW_KINDS = {"md": dg.MetadataValue.md, "path": dg.MetadataValue.path, "int": dg.MetadataValue.int,
              "float": dg.MetadataValue.float}  # the kinds of step_views' (kind, value) pairs


def _input_versions(context: dg.AssetExecutionContext, concept: str, datasets: tuple[str, ...] = ()) -> dict:
    """The data versions of the inputs: this concept's, and the dataset assets of each concept it trains in
    (``<asset>[<concept>]``)."""
    versions = {}
    for c in (concept, *datasets):
        for a in INPUT_ASSETS if c == concept else DATASET_INPUTS:
            key = a.key.to_user_string() + ("" if c == concept else f"[{c}]")
            versions[key] = latest_data_version(context, a.key, c)
    return versions


def datasets_table(job) -> str:
    """The concepts a job trains on, as markdown: token, class noun, photos and repeats of each."""
    photos = {}
    for r in job.training_images:
        if r.role == "instance":
            photos[job.row_source(r)] = photos.get(job.row_source(r), 0) + 1
    lines = ["| concept | token | class noun | photos | repeats |", "|---|---|---|---|---|"]
    repeats = next((k[1] for k in photos if k[0] == job.concept), 1)
    for concept, token, class_noun, repeats in [(job.concept, job.token, job.class_noun, repeats),
                                                *((d.concept, d.token, d.class_noun, d.repeats) for d in job.datasets)]:
        lines.append(f"| {concept} | {token} | {class_noun} | {photos.get((concept, repeats), 0)} | {repeats} |")
    return "\n".join(lines)


def check_training_inputs(context: dg.AssetExecutionContext, storage: PipelineStorage, job) -> None:
    """Before a GPU is claimed: the photos validation compares against are restored if damaged, and the latents
    bundle and control images must be intact (:class:`CorruptFile` names the file and the asset that rebuilds it)."""
    import pandas as pd

    from assets_pipeline.store import CorruptFile, check_file

    for concept in job.latents_dirs():  # this concept's photos, and those of the concepts it trains in
        photos = pd.DataFrame([asdict(r) for r in job.training_images
                               if r.role == "instance" and job.row_source(r)[0] == concept],
                              columns=["image_sha256", "source_path", "decoded_path"])
        restore_images(context, storage, concept, photos)
    needed = [(Path(d) / "latents.safetensors", "vae_latents") for d in job.latents_dirs().values()]
    needed += [(Path(r.control_path), "control_images") for r in job.training_images if r.control_path]
    for path, asset in needed:
        if (why := check_file(path)) is not None:
            owner = path.parent.parent.name if asset == "vae_latents" else job.concept
            raise CorruptFile(path, f"{why}; rematerialize {asset} for concept {owner!r} to rebuild it")


TRAINED_OUTPUT = """Trained in its own process (the `trainer` resource; one slot of the `gpu` pool) from the concept's
vae_latents, only when the concept's `methods` request it, and only when its job (training rows and captions,
resolved config, base model, code version) differs from the current output's: an identical job reuses the output
(`reused`, `reused_from_run_id`). Each training writes a version folder under
`artifacts/concepts/<concept>/{asset}/` (`path`), with `lineage.json`, `metrics.json` and the validation images;
`current.json` names the current one. Metadata: `clip_t` (CLIP-T: how well the validation images match their
prompts), `clip_i` (CLIP-I: how alike they are to the training photos), `mean_abs_change_vs_base` (mean pixel
change from the base model's images, 0 to 1), `final_loss`, `steps`, the training speed, `method_config` (the
resolved config) and the loss curve and validation grid. Checks: weights_finite, changes_base_output and
manifest_lists_training_images."""


def model_asset_description(method) -> str:
    """The UI's description of a model asset: what the method trains and how its output loads (its class's
    docstring), then what every model asset does and reports."""
    import inspect

    return inspect.cleandoc(method.__doc__) + "\n\n" + TRAINED_OUTPUT.format(asset=method.asset_name)


@dataclass
class Planned:
    """What a model step decided for one concept: its job, the metadata shown either way (the resolved config, the
    datasets), and whether its current output is reused (``reuse``: why, or why it trains)."""

    job: Any
    metadata: dict[str, Any]
    reuse: Any  # training/reuse.Reuse, or None: it trains
    why: str
    forced: bool


def plan_training(context, storage: PipelineStorage, base_model: BaseModelResource, clip_scorer: ClipScorerResource,
                  trainer: TrainerLauncher, concept: str, method) -> Planned | None:
    """One concept's training job for ``method``, and whether its current output (or an intact kept version of the
    same job, made current again) is reused; None when the concept does not request the method. Shared by the
    model assets and the pack runs (assets/packs.py); each decision is logged."""
    spec = spec_from_snapshot(storage, concept)
    if method.name not in spec.methods:
        context.log.info(f"{method.name} is not requested by concept {concept!r} (methods = {list(spec.methods)})")
        return None
    layout = storage.layout()
    job = plan_job(layout, base_model.resolve(layout.root, spec), spec, method.name, run_id=context.run_id,
                   data_root=storage.data_path(), launch=trainer.launch_settings(), scorer=clip_scorer.settings())
    job = replace(job, lineage={**job.lineage, "input_data_versions": _input_versions(
        context, concept, tuple(d.concept for d in job.datasets))})
    # The resolved config (e.g. LoRA's variant and ranks) beside the trainer's numbers, trained or reused.
    metadata = {"method_config": dg.MetadataValue.json(asdict(job.config))}
    if job.datasets:
        metadata["datasets"] = dg.MetadataValue.md(datasets_table(job))
    try:
        previous = current_output(layout, concept, method.asset_name)
        damaged = None
    except UnreadableFile as e:  # as a lost current.json: recovered among the kept versions, or trained again
        context.log.warning(f"{e.path}: {e.why}; this run rewrites it (an intact kept version of the same job is "
                            "made current again, else it trains)")
        previous, damaged = None, e
    reuse, why = find_reusable(previous, job, CODE_VERSION)
    if damaged is not None:
        why = f"{damaged.path} is damaged ({damaged.why})"
    forced = force_requested(context.run.tags)
    if reuse is None and not forced:  # an identical output kept among the versions (current.json lost or moved)
        kept = find_reusable_version(layout.asset_dir(concept, method.asset_name), job, CODE_VERSION, previous)
        if kept is not None:
            write_json_atomic(layout.asset_dir(concept, method.asset_name) / CURRENT,
                              {"path": kept.path.name, "run_id": context.run_id})
            reuse, why = kept, (f"{why}, but {kept.path.name}, kept among the versions, is an intact output of "
                                f"this same job (run {kept.lineage.get('run_id')}): made current again")
    if forced:
        context.log.info(f"{FORCE_RETRAIN_TAG}=true: training although {why}")
        reuse = None
    elif reuse is not None:
        context.log.info(f"reusing {reuse.path}: {why}; no training (tag {FORCE_RETRAIN_TAG}=true forces one)")
    else:
        context.log.info(f"training: {why}")
    return Planned(job, metadata, reuse, why, forced)


def reused_metadata(reuse) -> dict[str, Any]:
    """A reused output's materialization metadata: its views, and what its training reported."""
    views = {k: dg.MetadataValue.md(v) if t == "md" else dg.MetadataValue.path(v)
             for k, (t, v) in output_views(reuse.path).items()}
    # validation_steps: the same strips per step and chosen step the training reported
    views.update({k: VIEW_KINDS[t](v) for k, (t, v) in step_views(reuse.path).items()})
    return {**views, **reuse_metadata(reuse)}


def prepare_training(context, storage: PipelineStorage, job, method) -> Path:
    """Before a GPU is claimed: the job's inputs checked (each refusal says why), what crashed trainings of this
    asset left removed, and the job file written; returns its path."""
    check_training_inputs(context, storage, job)
    method.check_inputs(train_context(job), job.config)  # refuse here, with the reason, before a process starts
    method.check_model(job.base_model, job.config, job.concept)
    asset_dir = Path(job.output_dir).parent
    asset_dir.mkdir(parents=True, exist_ok=True)
    # The trainer's base renders and the checks' results are cache kinds its training and checks write.
    clean_stale_temporaries(context, storage, job.concept, method.asset_name, caches=("base_renders", "check_results"))
    job_path = asset_dir / f".job-{context.run_id}.json"
    job.save(job_path)
    return job_path


def make_current(context, storage: PipelineStorage, job, job_path: Path) -> None:
    """A trained output becomes current, the weights of the oldest versions are pruned, the job file removed."""
    asset_dir = Path(job.output_dir).parent
    # The version folder's name, relative to this folder: the artifact root can move.
    write_json_atomic(asset_dir / CURRENT, {"path": Path(job.output_dir).name, "run_id": context.run_id})
    for p in prune_asset(asset_dir, Path(job.output_dir), storage.keep_weight_versions, warn=context.log.warning):
        context.log.info(f"pruned the weights of {p.folder.name} ({human_bytes(p.bytes)}; newest "
                         f"{storage.keep_weight_versions} kept): its lineage, metrics and validation images stay")
    # A concurrent run of this asset removes a job file quiet for an hour (cleanup.GRACE_S); the trainer
    # read it at its start, so only this unlink notices.
    job_path.unlink(missing_ok=True)


def model_deps(method_name: str) -> list[dg.AssetsDefinition]:
    """The assets a model asset reads (its dependencies in the graph)."""
    return [vae_latents, clip_scored_images, class_images] + ([control_images] if method_name == "controlnet" else [])


def build_model_asset(method_name: str) -> dg.AssetsDefinition:
    method = get_method(method_name)

    @dg.asset(name=method.asset_name, partitions_def=concepts_partitions, group_name="models",
              code_version=CODE_VERSION, deps=model_deps(method_name), pool="gpu", output_required=False,
              kinds={"pytorch", "diffusers"}, description=model_asset_description(method))
    def _model(context: dg.AssetExecutionContext, storage: PipelineStorage, base_model: BaseModelResource,
               clip_scorer: ClipScorerResource, trainer: TrainerLauncher):
        planned = plan_training(context, storage, base_model, clip_scorer, trainer, context.partition_key, method)
        if planned is None:
            return
        job = planned.job
        context.add_asset_metadata(planned.metadata)
        if planned.reuse is not None:
            yield dg.MaterializeResult(data_version=dg.DataVersion(planned.reuse.data_version),
                                       metadata=reused_metadata(planned.reuse))
            return
        if (holder := lock_holder(job)) is not None:
            wait = min(LOCK_RETRY_S * 2 ** context.retry_number, LOCK_RETRY_MAX_S)
            context.log.info(f"run {holder} is training this same job ({lock_path(job)}): this step gives its gpu "
                             f"slot back and retries in {wait} s, then reuses that output (or resumes from its "
                             "checkpoints if that training failed)")
            raise dg.RetryRequested(max_retries=LOCK_RETRIES, seconds_to_wait=wait)
        job_path = prepare_training(context, storage, job, method)
        invocation = trainer.launch(context, job_path, job.cache_dir)
        ensure_run_active(context)  # a run that ended meanwhile (its worker killed) makes nothing current
        yield from invocation.get_results()
        make_current(context, storage, job, job_path)

    return _model


MODEL_ASSETS = [build_model_asset(name) for name in method_names()]
