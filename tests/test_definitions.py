"""definitions.py: the code location loads, keeps the architecture's asset keys, and imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

import dagster as dg

EXPECTED = {
    # The foundation's keys (ARCHITECTURE.md's table; user-facing, so they stay): group, upstream keys it must have.
    "concept_folders": ("dataset", set()),
    "raw_images": ("dataset", {"concept_folders"}),
    "captioned_images": ("dataset", {"raw_images"}),
    "filtered_images": ("dataset", {"captioned_images"}),
    "clip_scored_images": ("dataset", {"filtered_images"}),
    "control_images": ("dataset", {"clip_scored_images"}),
    "vae_latents": ("latents", {"clip_scored_images"}),
}


def test_definitions_load_with_the_architecture_asset_graph():
    from assets_pipeline.definitions import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert set(EXPECTED) <= keys
    for key, (group, parents) in EXPECTED.items():
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == group, key
        assert parents <= {p.to_user_string() for p in node.parent_keys}, key
    for key in graph.get_all_asset_keys():  # every asset, including ones added later
        node = graph.get(key)
        assert node.code_version or node.is_observable, key  # concept_folders: observed, not computed
        assert isinstance(node.partitions_def, dg.DynamicPartitionsDefinition), key
        assert node.partitions_def.name == "concepts", key
    assert graph.get(dg.AssetKey("vae_latents")).pools == {"gpu"}


def test_jobs_sensors_and_schedule_are_registered():
    from assets_pipeline.definitions import defs

    for name in ("ingest_concept", "build_concept", "train_concept", "train_models"):
        assert defs.resolve_job_def(name).partitions_def.name == "concepts"
    # the folder sensor builds new concepts in batches; automation rebuilds what a changed folder invalidates
    assert defs.resolve_sensor_def("concept_folder_sensor").job_name == "build_concepts"
    batch = defs.resolve_job_def("build_concepts")  # its GPU half takes the gpu pool, as the asset steps do
    assert {n.name: n.definition.pool for n in batch.nodes} == {"build_inputs": None, "build_latents": "gpu"}
    assert defs.resolve_sensor_def("dataset_automation") is not None
    # tells a run waiting for a pool slot who holds it (assets_pipeline/pools.py); requests no runs
    slots = defs.resolve_sensor_def("pool_slot_sensor")
    assert slots.default_status == dg.DefaultSensorStatus.RUNNING and not slots.targets
    # the nightly retraining launches pack runs (one op: several concepts' partitions per run, assets/packs.py)
    assert defs.resolve_schedule_def("retrain_schedule").job_name == "train_packs"
    assert defs.resolve_job_def("train_packs").partitions_def is None


def test_importing_definitions_imports_nothing_heavy():
    heavy = ["torch", "diffusers", "open_clip", "transformers", "controlnet_aux", "datasets"]
    code = (
        "import sys, json; import assets_pipeline.definitions; "
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
