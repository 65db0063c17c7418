"""Dataset builds of many concepts in one run: how new concepts are built (a mass upload of 10,000 folders is 100
runs, not 10,000).

An asset step materializes one partition, or, under a backfill policy, a range of partitions with one data version
and one set of metadata between them; each concept's dataset assets need their own data versions (one concept's new
photo must rebuild that concept only), so a batch is a job of two ops over a list of concepts. For each concept the
first runs the dataset assets' own bodies in graph order (``raw_images`` to ``control_images``: CPU, captioner, CLIP),
the second ``class_images`` and ``vae_latents`` in the `gpu` pool, as the asset steps are. Each asset's partition is
reported as its asset step reports it: a materialization with its data version, metadata, code version and the
data version and event of each dependency (so staleness and automation read it as usual), then its checks; a
blocking check that fails stops that concept's downstream assets, as in an asset run. The run announces every
partition it will materialize when it starts, so the UI shows them in progress and automation leaves them alone.
A concept that fails stops alone: the others are built, and the run fails at its end naming each.

The folder sensor requests these runs for new concepts (``sensors.py``, up to ``BATCH_SIZE`` concepts a run);
automation rebuilds changed ones through the assets themselves. Launchpad: ``ops.build_inputs.config.concepts``.
"""

import inspect
import traceback
from typing import Any

import dagster as dg
from pydantic import Field

from assets_pipeline.assets.common import BODIES, Step, announce_planned, provenance_tags
from assets_pipeline.assets.dataset import (
    captioned_images, clip_scored_images, control_images, filtered_images, raw_images,
)
from assets_pipeline.assets.dataset_checks import DATASET_CHECKS
from assets_pipeline.assets.latents import vae_latents
from assets_pipeline.assets.priors import class_images
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import (
    AcceleratorResource, BaseModelResource, CaptionerResource, ClipScorerResource, PipelineStorage,
)

BATCH_SIZE = 100  # concepts per batch run the folder sensor requests
BATCH_TAG = "assets_pipeline/batch"  # on each batch run: how many concepts it builds
INPUT_ASSETS = [raw_images, captioned_images, filtered_images, clip_scored_images, control_images]
GPU_ASSETS = [class_images, vae_latents]  # pool "gpu", as their asset steps


class BatchConfig(dg.Config):
    concepts: list[str] = Field(description="The concepts (partitions of 'concepts') whose datasets to build.")


def _call(body, step: Step, resources: dict[str, Any]):
    """An asset's or check's body with this concept's step as its context and the resources it names."""
    names = list(inspect.signature(body).parameters)[1:]
    return body(step, **{n: resources[n] for n in names})


def _checks_of(asset: dg.AssetsDefinition) -> list:
    return [c for c in DATASET_CHECKS if asset.key in {k.asset_key for k in c.check_keys}]


def build_assets(context: dg.OpExecutionContext, assets: list[dg.AssetsDefinition], state: dict,
                 resources: dict[str, Any]):
    """Each concept's partition of each asset, in order, as its asset step would materialize it: yields the
    materializations and check evaluations. ``state`` (updated, carried from op to op): ``concepts``; ``failed``:
    concept -> why (the run fails naming it); ``stopped``: concepts that raised (nothing more is built for them);
    ``blocked``: concept -> assets not built or held back by a blocking check (their downstream is not built)."""
    failed, stopped, blocked = state["failed"], state["stopped"], state["blocked"]
    for concept in state["concepts"]:
        for asset in assets:
            if concept in stopped:
                break
            key, name = asset.key, asset.key.to_user_string()
            deps = sorted(asset.dependency_keys, key=lambda k: k.to_user_string())
            if any(d.to_user_string() in blocked.get(concept, []) for d in deps):
                blocked.setdefault(concept, []).append(name)
                continue
            step = Step(concept, context.log, context.instance, key)
            try:
                if key == raw_images.key:  # first, the folder's data version, as the sensor would report it
                    yield from observe_folder(context.instance, resources["storage"], concept)
                res = _call(BODIES[name], step, resources)
            except Exception as e:  # this concept stops; the others go on (named in the run's failure)
                context.log.error(f"{name} of concept {concept!r} failed:\n{traceback.format_exc()}")
                failed[concept] = f"{name}: {type(e).__name__}: {e}"
                stopped.append(concept)
                break
            yield dg.AssetMaterialization(key, partition=concept, metadata=res.metadata, tags=provenance_tags(
                context.instance, asset.code_versions_by_key[key], deps, concept, res.data_version.value))
            for check in _checks_of(asset):
                [spec] = check.check_specs
                try:
                    result = _call(BODIES[spec.name], step, resources)
                except Exception as e:
                    context.log.error(f"check {spec.name} of concept {concept!r} failed:\n{traceback.format_exc()}")
                    failed[concept] = f"check {spec.name}: {type(e).__name__}: {e}"
                    stopped.append(concept)
                    break
                # blocking=False: this op blocks per concept itself (below); a blocking evaluation that failed
                # would fail the op, and so every other concept's remaining assets
                yield dg.AssetCheckEvaluation(asset_key=key, check_name=spec.name, passed=result.passed,
                                              metadata=result.metadata, description=result.description,
                                              severity=result.severity, blocking=False, partition=concept)
                if spec.blocking and not result.passed and result.severity == dg.AssetCheckSeverity.ERROR:
                    # what depends on it is not built, as in an asset run (the rest of the concept is)
                    failed[concept] = f"blocking check {spec.name} of {name} failed"
                    blocked.setdefault(concept, []).append(name)


def observe_folder(instance: dg.DagsterInstance, storage: PipelineStorage, concept: str):
    """The concept folder's ``concept_folders`` observation, where Dagster does not hold this version yet: a new
    concept's first. The folder sensor leaves a concept of a pending batch to it, so that this version and the
    ingest that follows it land together (automation sees the ingest, not a changed folder to rebuild)."""
    from assets_pipeline.partitions.discovery import read_folder
    from assets_pipeline.partitions.versions import observation, reported_versions

    state = read_folder(storage.concept_dir(concept))
    if state.digest is not None and reported_versions(instance, [concept]).get(concept) != state.digest:
        yield observation(concept, state)


def _resources(context) -> dict[str, Any]:
    r = context.resources
    return {k: getattr(r, k) for k in ("storage", "captioner", "accelerator", "base_model", "clip_scorer")
            if hasattr(r, k)}


@dg.op(out={"built": dg.Out(dict)},
       description="Build the configured concepts' dataset inputs (raw_images to control_images), concept by concept.")
def build_inputs(context: dg.OpExecutionContext, config: BatchConfig, storage: PipelineStorage,
                 captioner: CaptionerResource, accelerator: AcceleratorResource, base_model: BaseModelResource,
                 clip_scorer: ClipScorerResource):
    concepts = list(dict.fromkeys(config.concepts))
    if not concepts:
        raise dg.Failure("build_inputs: concepts = []: expected at least one concept")
    known = set(context.instance.get_dynamic_partitions(concepts_partitions.name))
    # One removed (`concept remove`) since the batch was requested fails alone; the others are built.
    unknown = {c: f"not a partition of {concepts_partitions.name!r} (removed since this run was requested?)"
               for c in concepts if c not in known}
    context.log.info(f"building the datasets of {len(concepts) - len(unknown)} concept(s): "
                     + ", ".join(c for c in concepts if c not in unknown))
    announce_planned(context, [a.key for a in INPUT_ASSETS + GPU_ASSETS], [c for c in concepts if c not in unknown])
    state: dict = {"concepts": concepts, "failed": dict(unknown), "stopped": list(unknown), "blocked": {}}
    yield from build_assets(context, INPUT_ASSETS, state, _resources(context))
    yield dg.Output(state, "built")


@dg.op(pool="gpu", out={},
       description="Build the concepts' class images and latents (pool gpu), then fail if any concept failed.")
def build_latents(context: dg.OpExecutionContext, built: dict, storage: PipelineStorage,
                  accelerator: AcceleratorResource, base_model: BaseModelResource):
    yield from build_assets(context, GPU_ASSETS, built, _resources(context))
    concepts, failed = built["concepts"], built["failed"]
    if failed:
        raise dg.Failure(
            description=f"{len(failed)} of {len(concepts)} concept(s) failed; the others are built: "
            + "; ".join(f"{c}: {why}" for c, why in failed.items()),
            metadata={c: dg.MetadataValue.text(why) for c, why in failed.items()})


@dg.job(name="build_concepts", executor_def=dg.in_process_executor,
        description="Build several concepts' datasets in one run (one process): the folder sensor launches one per "
        f"batch of up to {BATCH_SIZE} new concepts. Launchpad: ops.build_inputs.config.concepts.")
def build_concepts_job():
    build_latents(build_inputs())
