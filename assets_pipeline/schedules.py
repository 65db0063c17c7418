"""Scheduled retraining: each tick (nightly by default) retrains exactly the (concept, method) pairs whose
training inputs changed since their current output, for the methods each concept requests."""

import os
from dataclasses import dataclass
from datetime import timezone

import dagster as dg

from assets_pipeline.jobs import train_models_job
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import BaseModelResource, ClipScorerResource, PipelineStorage, TrainerLauncher

RETRAIN_CRON_ENV = "ASSETS_PIPELINE_RETRAIN_CRON"
DEFAULT_RETRAIN_CRON = "0 3 * * *"  # 03:00 every night


@dataclass(frozen=True)
class RetrainDecision:
    concept: str
    method: str
    asset: str
    retrain: bool
    reason: str
    identity: str = ""


def plan_retraining(storage: PipelineStorage, base_model: BaseModelResource, clip_scorer: ClipScorerResource,
                    trainer: TrainerLauncher, concepts: list[str]) -> list[RetrainDecision]:
    """For each concept and requested method: retrain when the current output is not reusable for the job it
    would run now (training rows with their captions, resolved config, base model, code version; intact weights),
    the same test a model asset applies before training (training/reuse.py).

    Concepts whose dataset is not built yet, or whose quality subset fails the readiness rules (the blocking
    dataset checks), are skipped with the reason.
    """
    from assets_pipeline.stages.readiness import readiness
    from assets_pipeline.tables import read_asset_table
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import TrainingInputError
    from assets_pipeline.training.plan import CODE_VERSION, plan_job, train_context
    from assets_pipeline.store import UnreadableFile
    from assets_pipeline.training.reuse import current_output, find_reusable

    layout = storage.layout()
    decisions = []
    for concept in concepts:
        if not (layout.asset_dir(concept, "vae_latents") / "index.parquet").is_file():
            decisions.append(RetrainDecision(concept, "*", "*", False, "dataset not built yet"))
            continue
        spec = layout.spec(concept)
        ready = readiness(read_asset_table(layout, concept, "clip_scored_images", "scores.parquet"))
        ref = base_model.resolve(layout.root, spec)
        for name in spec.methods:
            method = get_method(name)
            if not ready.ready:
                decisions.append(RetrainDecision(concept, name, method.asset_name, False,
                                                 "dataset checks fail: " + "; ".join(ready.problems())))
                continue
            try:  # a concept it trains in (LoRA's datasets) not built, or from another base model: skipped, with why
                job = plan_job(layout, ref, spec, name, run_id="schedule", data_root=storage.data_path(),
                               launch=trainer.launch_settings(), scorer=clip_scorer.settings())
                method.check_inputs(train_context(job), job.config)
                method.check_model(ref, job.config, concept)
            except TrainingInputError as e:
                decisions.append(RetrainDecision(concept, name, method.asset_name, False, str(e)))
                continue
            identity = job.identity()
            try:
                out = current_output(layout, concept, method.asset_name)
            except UnreadableFile as e:  # one concept's damaged pointer: its run repairs it; the others go on
                decisions.append(RetrainDecision(concept, name, method.asset_name, True, f"{e.path}: {e.why}; its "
                                                 "run rewrites it (an intact kept version of the same job is made "
                                                 "current again, else it trains)", identity))
                continue
            # The same test the model asset applies before it trains, so a scheduled run is never a no-op reuse.
            reuse, why = find_reusable(out, job, CODE_VERSION)
            if reuse is not None:
                decisions.append(RetrainDecision(concept, name, method.asset_name, False, "up to date", identity))
            else:
                why = "no trained output yet" if out is None else why
                decisions.append(RetrainDecision(concept, name, method.asset_name, True, why, identity))
    return decisions


@dg.schedule(
    cron_schedule=os.environ.get(RETRAIN_CRON_ENV, DEFAULT_RETRAIN_CRON),
    job=train_models_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=f"Retrain stale (concept, method) outputs; cron from ${RETRAIN_CRON_ENV} (default nightly).",
)
def retrain_schedule(context: dg.ScheduleEvaluationContext, storage: PipelineStorage,
                     base_model: BaseModelResource, clip_scorer: ClipScorerResource, trainer: TrainerLauncher):
    concepts = context.instance.get_dynamic_partitions(concepts_partitions.name)
    decisions = plan_retraining(storage, base_model, clip_scorer, trainer, concepts)
    for d in decisions:
        if not d.retrain:
            context.log.info(f"{d.concept}/{d.method}: {d.reason}")
    tick = context.scheduled_execution_time.astimezone(timezone.utc).strftime("%Y%m%dT%H%M") \
        if context.scheduled_execution_time else "manual"
    requests = [
        dg.RunRequest(
            # Same inputs, same tick -> same key: a re-evaluated tick never starts a second training.
            run_key=f"retrain:{d.concept}:{d.method}:{d.identity[:16]}:{tick}",
            partition_key=d.concept,
            asset_selection=[dg.AssetKey(d.asset)],
            tags={"retrain/reason": d.reason},
        )
        for d in decisions if d.retrain
    ]
    return requests or dg.SkipReason("every requested output is up to date (or its dataset is not ready)")
