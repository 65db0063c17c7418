"""Pack runs: the LoRAs (or textual-inversion tokens) of several concepts trained in one run, by one trainer
process, holding one slot of the ``gpu`` pool (issue 26).

A pack run is a run of the ``train_packs`` job: one op, :func:`train_pack`, configured with a method and the
concepts to train (the retraining schedule decides them: schedules.py; a run of one concept, or of a method that does
not pack, trains each alone the same way). It does for each concept what a model
asset's step does (assets/models.py: plan the job, reuse an identical output, check the inputs), hands every job
that must train to one trainer process (``python -m assets_pipeline.training --pack``: training/pack_trainer.py),
and then reports each concept as its own partition of the model asset:

- a materialization of ``lora_adapter`` / ``textual_inversion_embedding`` for that concept, with the same metadata,
  data version and files as a solo training, and the data-provenance tags Dagster's own asset steps write (code
  version, each dependency's data version and event), so the UI, the schedule and staleness see it as an ordinary
  materialization, up to date;
- the model checks (weights_finite, changes_base_output, manifest_lists_training_images) on that partition;
- a concept that fails (its inputs, a diverged loss, its output) gets no materialization; the run is marked failed
  at its end, after its pack-mates' materializations, so Dagster shows that partition failed and the others
  materialized. At the run's start each concept's materialization is announced as planned (the event Dagster
  logs for an asset run's partitions), which is what makes the UI show them in progress, then materialized or
  failed.

Why an op and not the model asset itself: an asset step of a partitioned asset materializes one partition (or, under
a single-run backfill policy, a contiguous range of partitions with one data version and one set of metadata); a pack
is any set of concepts, each with its own data version, metadata and checks. The op reports each partition's events
itself.
"""


import traceback
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from assets_pipeline.assets.checks import MODEL_CHECK_FUNCTIONS
from assets_pipeline.assets.common import announce_planned, provenance_tags
from assets_pipeline.assets.models import (
    Planned, make_current, model_deps, plan_training, prepare_training, reused_metadata,
)
from assets_pipeline.jobs import TRAINING_RUN_TAGS
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import (
    AcceleratorResource, BaseModelResource, ClipScorerResource, PipelineStorage, TrainerLauncher,
)
from assets_pipeline.resources.run_watch import ensure_run_active
from assets_pipeline.training.methods import get_method, method_names
from assets_pipeline.training.plan import CODE_VERSION

PACK_TAG = "assets_pipeline/pack"  # a pack run: "<method> x <number of concepts>"
UNPACKED_TAG = "assets_pipeline/unpacked"  # a run of one concept the schedule could not pack: why


class PackConfig(dg.Config):
    method: str = Field(default="lora", description="The method whose asset's partitions this run materializes: "
                        "'lora' (lora_adapter) and 'textual_inversion' (textual_inversion_embedding) pack; "
                        "'dreambooth' and 'controlnet' concepts train alone, one after another.")
    concepts: list[str] = Field(description="The concepts (partitions of the asset) to train in this run. Those "
                                "that can share a pack train as packs of up to the trainer's pack_size, the others "
                                "alone, one after another; an up-to-date output is reused, as by the asset.")


def _metadata(reported: dict[str, Any]) -> dict[str, Any]:
    """The metadata a trainer reported for a concept, as the solo trainer's Pipes materialization would carry it:
    ``{"raw_value", "type"}`` entries typed as Pipes types them, plain values as they are."""
    from dagster._core.definitions.metadata.external_metadata import metadata_value_from_external

    return {k: metadata_value_from_external(v["raw_value"], v["type"])
            if isinstance(v, dict) and v.keys() == {"raw_value", "type"} else v for k, v in reported.items()}


@dg.op(pool="gpu", out={},
       description="Train the configured concepts' LoRAs (or textual-inversion tokens) in one trainer process, as "
       "packs (docs/training.md, 'Many concepts, one GPU'), and materialize each concept's partition of the model "
       "asset with its checks.")
def train_pack(context: dg.OpExecutionContext, config: PackConfig, storage: PipelineStorage,
               base_model: BaseModelResource, clip_scorer: ClipScorerResource, trainer: TrainerLauncher,
               accelerator: AcceleratorResource):
    if config.method not in method_names():
        raise dg.Failure(f"train_pack: method = {config.method!r}; expected one of {method_names()}")
    concepts = list(dict.fromkeys(config.concepts))
    known = set(context.instance.get_dynamic_partitions(concepts_partitions.name))
    if not concepts or (unknown := [c for c in concepts if c not in known]):
        raise dg.Failure("train_pack: concepts = " + repr(config.concepts) + (
            f": {unknown} are not partitions of {concepts_partitions.name!r}" if concepts else
            ": expected at least one concept"))
    method = get_method(config.method)
    asset_key = dg.AssetKey(method.asset_name)
    pack_size = trainer.packing()
    context.log.info(f"{len(concepts)} concept(s), {method.asset_name}, packs of up to {pack_size}: "
                     + ", ".join(concepts))
    if why := context.run.tags.get(UNPACKED_TAG):
        context.log.info(f"not packed: {why}")
    announce_planned(context, [asset_key], concepts)

    failed: dict[str, str] = {}
    training: dict[str, tuple[Planned, Path]] = {}

    deps = [d.key for d in model_deps(method.name)]

    def materialize(concept: str, data_version: str, metadata: dict[str, Any]):
        yield dg.AssetMaterialization(asset_key, partition=concept, metadata=metadata,
                                      tags=provenance_tags(context.instance, CODE_VERSION, deps, concept, data_version))
        for check, blocking, _ in MODEL_CHECK_FUNCTIONS:
            name = check.__name__
            try:
                result = check(storage, base_model, accelerator, method, concept, context.run_id)
            except Exception as e:  # noqa: BLE001 - a check that cannot run fails its concept, not the others
                context.log.error(f"{method.asset_name}[{concept}] check {name} raised: {traceback.format_exc()}")
                failed[concept] = f"check {name} raised {type(e).__name__}: {e}"
                continue
            yield dg.AssetCheckEvaluation(asset_key=asset_key, check_name=name, passed=result.passed,
                                          metadata=result.metadata, description=result.description,
                                          severity=result.severity, blocking=blocking, partition=concept)
            if blocking and not result.passed:
                failed[concept] = f"blocking check {name} failed"

    # -- as the model asset's step does, per concept: plan, reuse, check the inputs ----------------------------
    from assets_pipeline.training.checkpoints import lock_holder, lock_path

    for concept in concepts:
        try:
            planned = plan_training(context, storage, base_model, clip_scorer, trainer, concept, method)
            if planned is None:
                continue
            if planned.reuse is not None:
                yield from materialize(concept, planned.reuse.data_version,
                                       {**planned.metadata, **reused_metadata(planned.reuse)})
                continue
            if (holder := lock_holder(planned.job)) is not None:  # that run materializes it
                context.log.info(f"{concept}: run {holder} is training this same job ({lock_path(planned.job)}); "
                                 "that run makes its output current, this one leaves it")
                continue
            training[concept] = (planned, prepare_training(context, storage, planned.job, method))
        except Exception as e:  # noqa: BLE001 - its own inputs: it fails alone, the others train
            context.log.error(f"{method.asset_name}[{concept}]: {type(e).__name__}: {e}")
            failed[concept] = f"{type(e).__name__}: {e}"
    if training:
        # -- one trainer process for all of them ------------------------------------------------------------
        outcomes: dict[str, dict] = {}
        trainer_error = None
        try:
            invocation = trainer.launch_pack(context, [path for _, path in training.values()],
                                             next(iter(training.values()))[0].job.cache_dir)
            for message in invocation.get_custom_messages():
                if isinstance(message, dict) and message.get("concept") in training:
                    outcomes[message["concept"]] = message
            if code := getattr(invocation, "returncode", 0):  # 1: a concept failed (its own message says why)
                trainer_error = f"the trainer process exited with code {code} before reporting it"
        except Exception as e:  # noqa: BLE001 - the process (a pod that failed): its concepts without output fail
            context.log.error(f"the pack's trainer failed: {traceback.format_exc()}")
            trainer_error = f"the trainer failed ({type(e).__name__}: {e})"
        ensure_run_active(context)  # a run that ended meanwhile (its worker killed) makes nothing current
        # -- each concept: its output, as the model asset's step makes it current ----------------------------
        from assets_pipeline.training.reuse import find_reusable

        for concept, (planned, job_path) in training.items():
            message = outcomes.get(concept, {})
            written, _ = find_reusable(Path(planned.job.output_dir), planned.job, CODE_VERSION)
            # Its output, complete and of this job, unless the trainer reported its failure (a trainer that wrote it
            # and died before reporting it leaves it complete: it is materialized, with the metadata it has on disk).
            if written is None or "error" in message:
                failed[concept] = message.get("error") or trainer_error or "the trainer reported no outcome for it"
                # (a trainer that exits 0 reports every concept: the last case is a trainer that lost a message)
                context.log.error(f"{method.asset_name}[{concept}] failed: {failed[concept]}")
                job_path.unlink(missing_ok=True)
                continue
            make_current(context, storage, planned.job, job_path)
            metadata = _metadata(message["metadata"]) if "metadata" in message else reused_metadata(written)
            yield from materialize(concept, written.data_version, {**planned.metadata, **metadata})
    if failed:
        raise dg.Failure(
            description=f"{len(failed)} of {len(concepts)} concept(s) failed; the others are materialized: "
            + "; ".join(f"{c}: {why}" for c, why in failed.items()),
            metadata={c: dg.MetadataValue.text(why) for c, why in failed.items()})


@dg.job(name="train_packs", tags=TRAINING_RUN_TAGS,
        description="Train several concepts' LoRAs (or textual-inversion tokens) in one run: the retraining schedule "
        "launches one per pack. Launchpad: ops.train_pack.config.concepts (and method).")
def train_packs_job():
    train_pack()
