"""Shared fixtures: models built once per session, fresh data and artifact roots per test.

The suite runs offline on a CPU: every model is built in code (the embedded tiny SD and CLIP), and the hub
clients are told they are offline, so a mistake fails fast instead of waiting on a network timeout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs one worker per core (pytest-xdist): one torch thread each, and in the processes they
    # start (trainers, Dagster step processes inherit it), or the workers' OpenMP threads spin against each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The modules that take longest (most build concepts through every asset or train), longest first, so that no
# worker is left with one of them at the end while the others idle (the order of the rest is pytest's).
_LONG_FIRST = ("test_runtime", "test_training", "test_flow", "test_sdxl", "test_reproduce", "test_multiprocess_training",
               "test_postgres", "test_orphaned_trainer", "test_gpu_e2e_script", "test_control_pairs", "test_pack_runs",
               "test_pack_training", "test_retraining", "test_relocation",
               "test_validation", "test_automation", "test_multi_concept", "test_k8s_trainer", "test_run_monitoring",
               "test_embedded", "test_lora_variants", "test_methods", "test_dataset_assets", "test_ui_metadata",
               "test_executor", "test_pool_slots", "test_resolve", "test_plan", "test_recipes")


@pytest.fixture(scope="session")
def built_models(tmp_path_factory) -> Path:
    """An artifact root holding the embedded base model and the embedded CLIP, built once for the session.

    Treat it as read-only: tests that write caches use :func:`artifact_root`, which links these models in.
    """
    from assets_pipeline.models.embedded import ensure_embedded
    from assets_pipeline.stages.scoring import ensure_embedded_clip

    root = tmp_path_factory.mktemp("built_models")
    ensure_embedded(root / "base_models")
    ensure_embedded_clip(root / "base_models")
    return root


@pytest.fixture(scope="session")
def embedded_model_dir(built_models) -> Path:
    from assets_pipeline.models.embedded import EMBEDDED, EMBEDDED_MODELS

    return built_models / "base_models" / EMBEDDED_MODELS[EMBEDDED][0]


def link_models(built_models: Path, root: Path) -> Path:
    """A fresh artifact root (empty caches) with the session's built models hard-linked in (those of
    ``built_models``, or of another root that holds base_models/, e.g. :func:`flow_root`)."""
    shutil.copytree(built_models / "base_models", root / "base_models", copy_function=os.link,
                    ignore=shutil.ignore_patterns(".fingerprints"))
    return root


def build_dataset_half(root: Path, built_models: Path, concept: str | None = None,
                       files: dict[str, bytes] | None = None, spec: str | None = None):
    """Fresh roots under ``root`` with one concept's dataset half built through Dagster (photos to latents):
    the demo concept by default, else ``concept`` with ``files`` and ``spec``. Returns the storage resource."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, default_resources
    from assets_pipeline.demo_data import DEMO_CONCEPT, write_demo_concept
    from assets_pipeline.resources import PipelineStorage
    from helpers import write_concept

    storage = PipelineStorage(data_root=str(root / "data"), artifact_root=str(link_models(built_models,
                                                                                           root / "artifacts")))
    if concept is None:
        concept = DEMO_CONCEPT
        write_demo_concept(root / "data")
    else:
        write_concept(root / "data", concept, files or {}, spec)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", [concept])
        res = dg.materialize(ASSETS, selection="group:dataset or group:priors or group:latents",
                             partition_key=concept, instance=instance,
                             resources={**default_resources(), "storage": storage})
    assert res.success
    return storage


@pytest.fixture(scope="session")
def models_root(built_models, tmp_path_factory) -> Path:
    """An artifact root with the session's embedded SD model linked in and the embedded SDXL built once (the
    models/ tests read it; treat it as read-only)."""
    from assets_pipeline.models.embedded import EMBEDDED_SDXL, ensure_embedded

    root = link_models(built_models, tmp_path_factory.mktemp("models") / "artifacts")
    ensure_embedded(root / "base_models", EMBEDDED_SDXL)
    return root


@pytest.fixture(scope="session")
def sdxl_ref(models_root):
    from assets_pipeline.models.resolve import resolve_base_model

    return resolve_base_model("embedded-sdxl", models_root)


@pytest.fixture(scope="session")
def sdxl_pipe(sdxl_ref):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_ref.location, local_files_only=True)


@pytest.fixture(scope="session")
def flow_root(built_models, tmp_path_factory) -> Path:
    """An artifact root with the session's embedded SD model linked in and the embedded SD 3.x and Flux.1 built once
    (read-only, as models_root)."""
    from assets_pipeline.models.embedded import EMBEDDED_FLUX, EMBEDDED_SD3, ensure_embedded

    root = link_models(built_models, tmp_path_factory.mktemp("flow") / "artifacts")
    for name in (EMBEDDED_SD3, EMBEDDED_FLUX):
        ensure_embedded(root / "base_models", name)
    return root


@pytest.fixture(scope="session")
def sd3_ref(flow_root):
    from assets_pipeline.models.resolve import resolve_base_model

    return resolve_base_model("embedded-sd3", flow_root)


@pytest.fixture(scope="session")
def flux_ref(flow_root):
    from assets_pipeline.models.resolve import resolve_base_model

    return resolve_base_model("embedded-flux", flow_root)


@pytest.fixture(scope="session")
def sd3_pipe(sd3_ref):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(sd3_ref.location, local_files_only=True)


@pytest.fixture(scope="session")
def flux_pipe(flux_ref):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(flux_ref.location, local_files_only=True)


@pytest.fixture(scope="session")
def tiny_pipe(embedded_model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(embedded_model_dir, local_files_only=True)


@pytest.fixture
def artifact_root(tmp_path, built_models) -> Path:
    return link_models(built_models, tmp_path / "artifacts")


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def storage(data_root, artifact_root):
    from assets_pipeline.resources import PipelineStorage

    return PipelineStorage(data_root=str(data_root), artifact_root=str(artifact_root))


@pytest.fixture(scope="session")
def encoders(built_models):
    """The embedded model's frozen VAE, text encoder and tokenizer, loaded once."""
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.stages.latents import load_encoders

    return load_encoders(resolve_base_model("embedded", built_models), built_models, "cpu")


@pytest.fixture
def image_cache(tmp_path):
    from assets_pipeline.store import ItemCache

    return ItemCache(tmp_path / "artifacts", "images", ".png")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (scripts/test.sh: ``--dist loadfile``, a module's tests on one worker, so its
    module-scoped fixtures are built once) the long modules start first. Tests marked ``gpu`` need CUDA: skipped,
    with the reason, on machines without one."""
    def module(item) -> str:
        return item.module.__name__.rsplit(".", 1)[-1]

    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: _LONG_FIRST.index(module(item)) if module(item) in _LONG_FIRST
                   else len(_LONG_FIRST))  # stable: the order within a module is kept
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def _no_leaked_dagster_instance():
    """Fail the test that leaves a Dagster instance entered, not whichever test happens to run next.

    Entering a DagsterInstance (or a schedule/sensor context over a persistent one) sets a context variable that
    only exiting resets. A leaked one holds a weak reference to an instance that is later garbage-collected, and
    every later ``materialize`` then fails with "Attempted to resolve undefined DagsterInstance weakref", at a
    point that depends on the garbage collector's timing.
    """
    from dagster._core.storage.defs_state.base import DefsStateStorage

    before = DefsStateStorage.get()
    yield
    after = DefsStateStorage.get()
    assert after is before, "this test left a DagsterInstance entered: use it (or the schedule/sensor context) in `with`"
