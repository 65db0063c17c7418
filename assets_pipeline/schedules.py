"""Scheduled retraining: each tick (nightly by default) retrains exactly the (concept, method) pairs whose
training inputs changed since their current output, for the methods each concept requests."""

import os
from dataclasses import dataclass
from datetime import timezone

import dagster as dg

from assets_pipeline.assets.packs import train_packs_job
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
    pack_key: tuple | None = None  # what its pack shares (training/pack.py pack_key); None: it trains alone
    unpacked: str = ""  # why it cannot be packed (training/pack.py refusal)


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
    from assets_pipeline.training.pack import pack_key, refusal
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
                                                 "current again, else it trains)", identity, None,
                                                 "its current.json is damaged: its own run repairs it"))
                continue
            # The same test the model asset applies before it trains, so a scheduled run is never a no-op reuse.
            reuse, why = find_reusable(out, job, CODE_VERSION)
            if reuse is not None:
                decisions.append(RetrainDecision(concept, name, method.asset_name, False, "up to date", identity))
            else:
                why = "no trained output yet" if out is None else why
                unpacked = refusal(job) or ""
                decisions.append(RetrainDecision(concept, name, method.asset_name, True, why, identity,
                                                 None if unpacked else pack_key(job), unpacked))
    return decisions


@dataclass(frozen=True)
class PackRun:
    """One run the schedule launches: a method's concepts, trained as one pack (several) or alone (one)."""

    method: str
    decisions: tuple[RetrainDecision, ...]
    unpacked: str = ""  # a run of one concept: why it was not packed ("" where nothing was due to pack it with)

    @property
    def concepts(self) -> list[str]:
        return [d.concept for d in self.decisions]


def pack_runs(decisions: list[RetrainDecision], pack_size: int) -> list[PackRun]:
    """The runs for the due (concept, method) pairs: those that can share a pack (same method and
    :func:`~assets_pipeline.training.pack.pack_key`) in runs of up to ``pack_size`` concepts, in the order decided;
    every other one in a run of its own, with why it was not packed."""
    groups: dict[tuple, list[RetrainDecision]] = {}
    runs = []
    for d in decisions:
        if not d.retrain:
            continue
        if d.pack_key is None or pack_size == 1:
            runs.append(PackRun(d.method, (d,), d.unpacked or ("the trainer's pack_size is 1" if pack_size == 1
                                                               and d.pack_key is not None else "")))
        else:
            groups.setdefault((d.method, d.pack_key), []).append(d)
    for (method, _), due in groups.items():
        runs += [PackRun(method, tuple(due[i:i + pack_size])) for i in range(0, len(due), pack_size)]
    return runs


def retrain_requests(runs: list[PackRun], tick: str) -> list[dg.RunRequest]:
    """A run of the ``train_packs`` job for each of ``runs`` (assets/packs.py)."""
    from assets_pipeline.assets.packs import PACK_TAG, UNPACKED_TAG
    from assets_pipeline.hashing import digest

    requests = []
    for run in runs:
        reasons = "; ".join(f"{d.concept}: {d.reason}" for d in run.decisions)
        requests.append(dg.RunRequest(
            # Same concepts, same inputs, same tick -> same key: a re-evaluated tick never starts a second training.
            run_key=f"retrain:{run.method}:{run.concepts[0]}+{len(run.concepts) - 1}:"
                    f"{digest(run.concepts, [d.identity for d in run.decisions])[:16]}:{tick}",
            run_config={"ops": {"train_pack": {"config": {"method": run.method, "concepts": run.concepts}}}},
            tags={"retrain/reason": reasons if len(reasons) <= 1000 else reasons[:997] + "...",
                  PACK_TAG: f"{run.method} x {len(run.concepts)}",
                  **({UNPACKED_TAG: run.unpacked} if run.unpacked else {})},
        ))
    return requests


@dg.schedule(
    cron_schedule=os.environ.get(RETRAIN_CRON_ENV, DEFAULT_RETRAIN_CRON),
    job=train_packs_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=f"Retrain stale (concept, method) outputs, several concepts' LoRAs (or textual-inversion tokens) per "
    f"run as packs of up to the trainer's pack_size; cron from ${RETRAIN_CRON_ENV} (default nightly).",
)
def retrain_schedule(context: dg.ScheduleEvaluationContext, storage: PipelineStorage,
                     base_model: BaseModelResource, clip_scorer: ClipScorerResource, trainer: TrainerLauncher):
    concepts = context.instance.get_dynamic_partitions(concepts_partitions.name)
    decisions = plan_retraining(storage, base_model, clip_scorer, trainer, concepts)
    for d in decisions:
        if not d.retrain:
            context.log.info(f"{d.concept}/{d.method}: {d.reason}")
    runs = pack_runs(decisions, trainer.packing())
    for run in runs:
        context.log.info(f"{run.method}: {', '.join(run.concepts)}" + (
            f" (a pack of {len(run.concepts)})" if len(run.concepts) > 1 else
            f" (alone: {run.unpacked})" if run.unpacked else " (alone: no other concept due to pack it with)"))
    tick = context.scheduled_execution_time.astimezone(timezone.utc).strftime("%Y%m%dT%H%M") \
        if context.scheduled_execution_time else "manual"
    return retrain_requests(runs, tick) or dg.SkipReason(
        "every requested output is up to date (or its dataset is not ready)")
