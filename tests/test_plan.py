"""training/plan.py: the job a model asset, the schedule and the checks plan for a concept. Its identity (what decides
reuse and resume) and every cache key upstream of it are the ones d663daf, the tree before the reshape, recorded
for the demo concepts (tests/data/d663daf_identities.json): a store built then is rebuilt now without recomputing
an item or retraining a model (checked end to end with the demo itself in the issue's closing note)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from assets_pipeline.training.plan import train_context
from helpers import make_job

RECORDED = Path(__file__).parent / "data" / "d663daf_identities.json"
# The class images d663daf rendered for the demo concepts. Rendering is float arithmetic, whose last bits depend
# on the CPU and the thread count; the images' sha256 enters the class rows' keys and DreamBooth's identity, so the
# store is given them, as a store built then would hold them (everything else here is rebuilt from the photos).
RECORDED_CLASS_IMAGES = Path(__file__).parent / "data" / "d663daf_class_images"


def test_the_training_context_counts_the_jobs_rows():
    job = make_job("controlnet", rows=[
        {"image_sha256": "a", "role": "instance", "caption": "c", "control_path": "/x/a.png"},
        {"image_sha256": "b", "role": "instance", "caption": "c"},
        {"image_sha256": "x", "role": "class", "caption": "d"}])
    ctx = train_context(job)
    assert (ctx.num_instance_images, ctx.num_class_images, ctx.num_control_images) == (2, 1, 1)
    assert (ctx.resolution, ctx.family, ctx.extra["control_paths"]) == (64, "sd1", ["/x/a.png"])


@pytest.mark.slow
def test_the_demo_concepts_plan_the_jobs_and_cache_keys_recorded_before_the_reshape(tmp_path, built_models):
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, default_resources
    from assets_pipeline.demo_data import DEMO_CONCEPT, DEMO_SDXL_CONCEPT, demo_sdxl_files, write_demo_concept
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.resources import BaseModelResource, PipelineStorage
    from assets_pipeline.training.methods import get_method
    from conftest import link_models
    from helpers import plan_for

    recorded = json.loads(RECORDED.read_text())
    storage = PipelineStorage(data_root=str(tmp_path / "data"),
                              artifact_root=str(link_models(built_models, tmp_path / "artifacts")))
    layout = storage.layout()
    for source, fingerprint in recorded["embedded_fingerprints"].items():  # every key below derives from these
        assert resolve_base_model(source, layout.root).fingerprint == fingerprint, source
    cache = layout.cache("class_images", ".png")
    for image in sorted(RECORDED_CLASS_IMAGES.glob("*.png")):
        cache.put(image.stem, lambda tmp, image=image: shutil.copyfile(image, tmp))
    write_demo_concept(storage.data_path())
    write_demo_concept(storage.data_path(), DEMO_SDXL_CONCEPT, demo_sdxl_files())
    concepts = [DEMO_CONCEPT, DEMO_SDXL_CONCEPT]
    versions = {}
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", concepts)
        for concept in concepts:
            res = dg.materialize(ASSETS, selection="group:dataset or group:priors or group:latents",
                                 partition_key=concept, instance=instance,
                                 resources={**default_resources(), "storage": storage})
            assert res.success
            for event in res.get_asset_materialization_events():
                mat = event.materialization
                versions[f"{mat.asset_key.to_user_string()}[{concept}]"] = mat.tags["dagster/data_version"]
                if mat.asset_key.to_user_string() == "class_images":  # every one a hit of what d663daf made
                    assert mat.metadata["items_computed"].value == 0 < mat.metadata["items_cached"].value
    assert versions == recorded["data_versions"]
    for kind, keys in recorded["cache_keys"].items():
        folder = layout.root / "cache" / kind
        assert sorted(p.name for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".sha256")
                      and not p.name.startswith(".")) == keys, kind
    for concept in concepts:
        spec = layout.spec(concept)
        ref = BaseModelResource().resolve(layout.root, spec)
        for method in spec.methods:
            asset = get_method(method).asset_name
            job = plan_for(storage, ref, spec, method)
            assert job.identity() == recorded["job_identities"][f"{asset}[{concept}]"], (concept, method)


@pytest.mark.parametrize("method", ["lora", "dreambooth", "textual_inversion", "controlnet"])
def test_several_processes_split_the_default_batch_and_refuse_an_explicit_one_that_cannot_split(method):
    """Issue 28, point 14: ``num_processes: 2`` with a concept that sets no batch trains (1 x 2: one micro-batch per
    process and step); one process keeps the default config exactly (the identities recorded above); a batch the
    concept sets is kept as set, and one that cannot be split is refused with the message that says what to do."""
    from dataclasses import asdict

    from assets_pipeline.concept import ConceptSpec
    from assets_pipeline.resources import TrainerLauncher
    from assets_pipeline.training.plan import Launch, method_config
    from assets_pipeline.training.step import per_process_batch

    spec = ConceptSpec(name="c", token="sks", class_noun="dog", methods=(method,))
    one = method_config(spec, method, 5, quick=False)
    assert (one.train_batch_size, one.gradient_accumulation_steps) == (1, 1)
    assert asdict(method_config(spec, method, 5, False, TrainerLauncher().launch_settings())) == asdict(one)
    launch = TrainerLauncher(num_processes=2, device="cpu").launch_settings()
    assert launch.num_processes == 2
    two = method_config(spec, method, 5, quick=False, launch=launch)
    assert (two.train_batch_size, two.gradient_accumulation_steps) == (1, 2)
    assert asdict(two) == {**asdict(one), "gradient_accumulation_steps": 2}  # nothing else changes
    assert per_process_batch(two.train_batch_size, two.gradient_accumulation_steps, 2) == (1, 1)
    # The least multiple: 3 and 4 processes; a default batch that already divides is kept (4 = 2 x 2 on 2).
    assert method_config(spec, method, 5, False, Launch(num_processes=3)).gradient_accumulation_steps == 3
    assert method_config(spec, method, 5, False, Launch(num_processes=4)).gradient_accumulation_steps == 4
    # Run-time overrides (the tests', the benchmarks') that set a batch count as set too.
    assert method_config(spec, method, 5, False, launch, {"train_batch_size": 4}).gradient_accumulation_steps == 1

    for section in ({"train_batch_size": 1}, {"gradient_accumulation_steps": 1}, {"train_batch_size": 3}):
        explicit = ConceptSpec(name="c", token="sks", class_noun="dog", methods=(method,),
                               overrides={method: section})
        cfg = method_config(explicit, method, 5, quick=False, launch=launch)
        assert {k: getattr(cfg, k) for k in section} == section
        assert cfg.gradient_accumulation_steps * cfg.train_batch_size in (1, 3)  # kept as set
        with pytest.raises(ValueError, match=r"cannot be split over 2 processes: make it a multiple of 2 \(e\.g\. "
                                             r"gradient_accumulation_steps = 2\) or train with fewer processes"):
            per_process_batch(cfg.train_batch_size, cfg.gradient_accumulation_steps, 2)
