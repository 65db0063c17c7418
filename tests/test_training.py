"""The four methods end to end through Dagster on the embedded model, and each output loaded back into a
fresh stock-diffusers pipeline with no project code in the loading path."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import link_models

from helpers import METHODS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory, built_models):
    """The demo concept (all four methods requested) built once through Dagster, trained outputs included."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.demo_data import DEMO_CONCEPT, write_demo_concept
    from assets_pipeline.resources import PipelineStorage, TrainerLauncher

    root = tmp_path_factory.mktemp("training")
    data = root / "data"
    artifacts = link_models(built_models, root / "artifacts")
    write_demo_concept(data)
    storage = PipelineStorage(data_root=str(data), artifact_root=str(artifacts))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("concepts", [DEMO_CONCEPT])
    # TensorBoard through accelerate's trackers, and torch.profiler over the last two steps, so every method's
    # training also proves the tracking and profiling paths.
    resources = {**default_resources(), "storage": storage,
                 "trainer": TrainerLauncher(log_with="tensorboard", performance={"profile_steps": 2})}
    res = dg.materialize([*ASSETS, *CHECKS], partition_key=DEMO_CONCEPT, instance=instance, resources=resources)
    assert res.success
    mats = {e.materialization.asset_key.to_user_string(): e.materialization
            for e in res.get_asset_materialization_events()}
    checks = {(c.asset_key.to_user_string(), c.check_name): c for c in res.get_asset_check_evaluations()}
    return SimpleNamespace(res=res, mats=mats, checks=checks, storage=storage, artifacts=artifacts,
                           concept=DEMO_CONCEPT, base=artifacts / "base_models" / "embedded-tiny-sd-v1",
                           instance=instance, resources=resources, data=data)


def _out(demo, asset: str) -> Path:
    return Path(demo.mats[asset].metadata["path"].value)


def _render(pipe, prompt: str, seed: int = 0, **kw) -> np.ndarray:
    import torch

    pipe.set_progress_bar_config(disable=True)
    img = pipe(prompt, num_inference_steps=4, height=64, width=64, generator=torch.Generator().manual_seed(seed),
               output_type="np", **kw).images[0]
    return img


def _stock_pipeline(base: Path, method: str, out: Path):
    """How a diffusers user loads each output: nothing from this project."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    if method == "dreambooth":
        return StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    if method == "controlnet":
        cn = ControlNetModel.from_pretrained(out, local_files_only=True)
        return StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=cn, local_files_only=True)
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    if method == "lora":
        pipe.load_lora_weights(out)
    else:
        pipe.load_textual_inversion(out / "learned_embeds.safetensors", token="<sks>")
    return pipe


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_passes_its_checks(demo_build, method):
    import dagster as dg

    asset = METHODS[method].asset
    assert asset in demo_build.mats, f"{asset} was not materialized"
    out = _out(demo_build, asset)
    for name in ("lineage.json", "metrics.json", "loss.csv", "loss.png", "validation"):
        assert (out / name).exists(), name
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")), "weights must be safetensors only"
    for check in ("weights_finite", "changes_base_output", "manifest_lists_training_images"):
        assert demo_build.checks[(asset, check)].passed, check
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["clip_t"]) and np.isfinite(metrics["clip_i"])
    assert metrics["steps"] == len((out / "loss.csv").read_text().splitlines()) - 1
    md = demo_build.mats[asset].metadata
    # What a person sees in the UI: the loss curve and the labeled validation grid as images, and the key numbers
    # as numeric metadata (which Dagster plots across materializations).
    assert md["loss_curve"].value.startswith("![training loss per step](data:image/png;base64,")
    assert md["preview"].value.startswith("![validation: base vs trained, per prompt and seed](data:image/jpeg;")
    from PIL import Image

    with Image.open(out / "validation" / "grid.png") as grid:  # 2 prompts x (base, trained) per seed, 256 px each
        assert grid.width >= 2 * 256 * len(metrics["validation_seeds"]) and grid.height >= 2 * 256
    for key in ("final_loss", "clip_t", "clip_i", "mean_abs_change_vs_base"):
        assert isinstance(md[key], dg.FloatMetadataValue), key
    assert isinstance(md["steps"], dg.IntMetadataValue) and md["reused"].value is False


def test_a_build_hands_its_first_training_to_a_trainer_started_ahead_and_a_rebuild_starts_none(demo_build):
    """Issue 28, point 16: the build's raw_images found new inputs, so a trainer process was started then and
    imported its libraries while the dataset steps ran; the first model step handed it its job (its training is
    checked by every test on this build), the later ones started their own; none is left running. A rebuild with
    nothing changed starts none."""
    import re

    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS
    from test_spare_trainer import _alive

    messages = [e.user_message for e in demo_build.instance.all_logs(demo_build.res.run_id)]
    started = [m for m in messages if "started a trainer process ahead (pid " in m]
    assert len(started) == 1, started
    pid = int(re.search(r"\(pid (\d+)\)", started[0]).group(1))
    assert len([m for m in messages if f"ahead (pid {pid}) takes this job" in m]) == 1
    assert not _alive(pid)
    res = dg.materialize([*ASSETS, *CHECKS], selection=dg.AssetSelection.assets("raw_images", "lora_adapter"),
                         partition_key=demo_build.concept, instance=demo_build.instance,
                         resources=demo_build.resources)
    assert res.success
    again = [e.user_message for e in demo_build.instance.all_logs(res.run_id)]
    assert any(m.startswith("reusing ") for m in again)
    assert not any("trainer process ahead" in m for m in again)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_reports_progress_and_logs_to_tensorboard(demo_build, method):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _out(demo_build, METHODS[method].asset)
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    expected = [float(row.split(",")[1]) for row in (out / "loss.csv").read_text().splitlines()[1:]]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))
    assert np.allclose(losses, expected, rtol=1e-5) and len(events.Scalars("train/lr")) >= 1
    # Progress reached the run's log through Pipes: step, percentage, loss, and an ETA once the rate is known.
    messages = [e.user_message for e in demo_build.instance.all_logs(demo_build.res.run_id)]
    assert any(f"step {steps}/{steps} (100%) loss" in m for m in messages), method
    assert any("ETA" in m for m in messages)
    # profile_steps = 2: the last two steps' trace and op table travel with the output; the rate is the others'.
    speed = json.loads((out / "metrics.json").read_text())["training_speed"]
    assert speed["profile"]["steps"] == 2 and speed["profile"]["wall_s"] > 0 and speed["images_per_s"] > 0
    assert any("profiled the last 2 steps" in m for m in messages), method
    trace = json.loads(gzip.decompress((out / "profile" / "trace.json.gz").read_bytes()))
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    assert "aten::" in (out / "profile" / "ops.txt").read_text()


@pytest.mark.parametrize("method", list(METHODS))
def test_output_loads_in_stock_diffusers_and_changes_the_image(demo_build, method):
    from diffusers import StableDiffusionPipeline

    out = _out(demo_build, METHODS[method].asset)
    pipe = _stock_pipeline(demo_build.base, method, out)
    prompt = "a photo of <sks> scene" if method == "textual_inversion" else "a photo of sks scene"
    kw = {}
    if method == "controlnet":
        from PIL import Image

        control = json.loads((out / "lineage.json").read_text())["training_images"][0]["image_sha256"]
        from assets_pipeline.assets.common import read_upstream

        table = read_upstream(demo_build.storage, demo_build.concept, "control_images", "control.parquet")
        kw["image"] = Image.open(table.set_index("image_sha256").loc[control, "control_path"])
    tuned = _render(pipe, prompt, **kw)
    base = _render(StableDiffusionPipeline.from_pretrained(demo_build.base, local_files_only=True), prompt)
    assert tuned.shape == base.shape == (64, 64, 3)
    assert np.abs(tuned - base).max() > 0, "the trained output leaves the image unchanged"


def test_lineage_manifest_lists_exactly_the_training_rows(demo_build):
    import pandas as pd
    from safetensors import safe_open

    from assets_pipeline.hashing import sha256_file
    from assets_pipeline.training.output import tensors_digest

    index = pd.read_parquet(demo_build.artifacts / "concepts" / demo_build.concept / "vae_latents" / "index.parquet")
    for method, contract in METHODS.items():
        out = _out(demo_build, contract.asset)
        manifest = json.loads((out / "lineage.json").read_text())
        roles = {"instance", "class"} if method == "dreambooth" else {"instance"}
        expected = {(r.image_sha256, r.role, r.caption) for r in index.itertuples() if r.role in roles}
        listed = {(r["image_sha256"], r["role"], r["caption"]) for r in manifest["training_images"]}
        assert listed == expected, method
        assert manifest["run_id"] == demo_build.res.run_id
        assert manifest["base_model"]["fingerprint"]
        assert set(manifest["input_data_versions"]) >= {"raw_images", "vae_latents", "clip_scored_images"}
        assert all(manifest["input_data_versions"][k] for k in ("raw_images", "vae_latents"))
        digest = sha256_file(out / "lineage.json")
        sums = dict(line.split("  ")[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
        assert set(sums) == set(manifest["weights"])
        for rel, entry in manifest["weights"].items():
            assert tensors_digest(out / rel) == entry["tensors_sha256"]
            assert sha256_file(out / rel) == sums[rel]
            with safe_open(str(out / rel), framework="pt") as f:
                assert f.metadata()["lineage_sha256"] == digest


def test_trained_outputs_have_the_usual_file_mode(demo_build):
    """safetensors creates its files 0600; every output file gets the mode any other new file gets."""
    from assets_pipeline.store import FILE_MODE

    for asset in (contract.asset for contract in METHODS.values()):
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in _out(demo_build, asset).rglob("*") if p.is_file()}
        assert set(modes.values()) == {oct(FILE_MODE)}, (asset, modes)


def test_kohya_lora_loads_through_diffusers_and_matches(demo_build):
    from diffusers import StableDiffusionPipeline

    out = _out(demo_build, "lora_adapter")
    images = []
    for weight_name in ("pytorch_lora_weights.safetensors", "kohya_lora.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(demo_build.base, local_files_only=True)
        pipe.load_lora_weights(out, weight_name=weight_name)
        images.append(_render(pipe, "a photo of sks scene"))
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)


def test_textual_inversion_changes_only_its_token(demo_build):
    from safetensors.torch import load_file

    out = _out(demo_build, "textual_inversion_embedding")
    learned = load_file(str(out / "learned_embeds.safetensors"))
    assert list(learned) == ["<sks>"] and learned["<sks>"].shape == (1, 32)
    a1111 = load_file(str(out / f"{demo_build.concept}.safetensors"))
    assert a1111["emb_params"].equal(learned["<sks>"])


def test_unrequested_method_is_skipped_not_failed(demo_build, tmp_path):
    import shutil

    import dagster as dg

    from assets_pipeline.definitions import ASSETS

    folder = demo_build.data / "lora_only"
    folder.mkdir()
    for name in ("astronaut.png", "chelsea.png", "coffee.png"):
        shutil.copy(demo_build.data / demo_build.concept / name, folder / name)
    (folder / "concept.toml").write_text('token = "sks"\nclass_noun = "scene"\nmethods = ["lora"]\n')
    demo_build.instance.add_dynamic_partitions("concepts", ["lora_only"])
    for selection in (["raw_images"], ["dreambooth_model"]):  # not connected: run in order, as the graph would
        res = dg.materialize(ASSETS, selection=selection, partition_key="lora_only",
                             instance=demo_build.instance, resources=demo_build.resources)
        assert res.success
    assert res.get_asset_materialization_events() == []
    assert not (demo_build.artifacts / "concepts" / "lora_only" / "dreambooth_model").exists()


def test_killed_training_resumes_from_its_checkpoint_and_matches(demo_build, tmp_path):
    """SIGKILL mid-run, start again: it resumes from the last checkpoint and ends with the same weights and
    loss curve as an uninterrupted run (batches and noise are a function of the step, RNG states are saved)."""
    import dataclasses
    import re
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    from assets_pipeline.assets.common import spec_from_snapshot
    from helpers import plan_for
    from assets_pipeline.resources import BaseModelResource, ClipScorerResource, TrainerLauncher

    spec = spec_from_snapshot(demo_build.storage, demo_build.concept)
    ref = BaseModelResource().resolve(demo_build.artifacts)
    steps = 24

    def make(name):
        job = plan_for(demo_build.storage, ref, spec, "lora", run_id=name, input_versions={},
                              trainer=TrainerLauncher(device="cpu"), clip_scorer=ClipScorerResource(),
                              overrides={"max_train_steps": steps, "checkpointing_steps": 2})
        job = dataclasses.replace(job, output_dir=str(tmp_path / name / "out"),
                                  checkpoint_dir=str(tmp_path / name / "ckpt"))
        path = tmp_path / f"{name}.json"
        job.save(path)
        return job, [sys.executable, "-m", "assets_pipeline.training", "--job", str(path)]

    full, cmd = make("full")
    subprocess.run(cmd, check=True, capture_output=True)
    killed, cmd = make("killed")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(Path(killed.checkpoint_dir).glob("*/step-*/losses.json")):
        assert proc.poll() is None, "training finished before a checkpoint could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not Path(killed.output_dir).exists()
    rerun = subprocess.run(cmd, check=True, capture_output=True, text=True)
    resumed = int(re.search(r"resumed from checkpoint at step (\d+)", rerun.stderr).group(1))
    assert 0 < resumed < steps
    a = load_file(str(Path(full.output_dir) / "pytorch_lora_weights.safetensors"))
    b = load_file(str(Path(killed.output_dir) / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (Path(full.output_dir) / "loss.csv").read_text() == (Path(killed.output_dir) / "loss.csv").read_text()
    manifest = json.loads((Path(killed.output_dir) / "lineage.json").read_text())
    assert manifest["resumed_from_step"] == resumed
    assert not any(Path(killed.checkpoint_dir).glob("*/step-*")), "checkpoints are removed once the output exists"


def test_two_trainers_of_the_same_job_take_turns(demo_build, tmp_path):
    """They share a checkpoint folder; the second used to crash on it (FileNotFoundError: random_states_0.pkl).
    Now it waits for the first, then trains, and both end with the same weights."""
    import dataclasses
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    from assets_pipeline.assets.common import spec_from_snapshot
    from helpers import plan_for
    from assets_pipeline.resources import BaseModelResource, ClipScorerResource, TrainerLauncher

    spec = spec_from_snapshot(demo_build.storage, demo_build.concept)
    ref = BaseModelResource().resolve(demo_build.artifacts)
    procs, jobs = [], []
    for name in ("first", "second"):
        job = plan_for(demo_build.storage, ref, spec, "lora", run_id=name, input_versions={},
                              trainer=TrainerLauncher(device="cpu"), clip_scorer=ClipScorerResource(),
                              overrides={"max_train_steps": 12, "checkpointing_steps": 2})
        job = dataclasses.replace(job, output_dir=str(tmp_path / name), checkpoint_dir=str(tmp_path / "ckpt"))
        job.save(tmp_path / f"{name}.json")
        jobs.append(job)
        procs.append(subprocess.Popen([sys.executable, "-m", "assets_pipeline.training", "--job",
                                       str(tmp_path / f"{name}.json")], stderr=subprocess.PIPE, text=True))
        deadline = time.time() + 300
        while name == "first" and not list((tmp_path / "ckpt").glob("*/step-*")):  # the first is training
            assert procs[0].poll() is None and time.time() < deadline
            time.sleep(0.05)
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "waiting for it to finish" in errs[1] and "waiting" not in errs[0]
    a, b = (load_file(str(Path(j.output_dir) / "pytorch_lora_weights.safetensors")) for j in jobs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _versions(demo, asset: str) -> list[str]:
    return sorted(p.name for p in (demo.artifacts / "concepts" / demo.concept / asset).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def test_identical_job_reuses_the_current_output_and_the_tag_forces_training(demo_build):
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS
    from assets_pipeline.resources import TrainerLauncher
    from assets_pipeline.training.reuse import FORCE_RETRAIN_TAG

    class NoTraining(TrainerLauncher):
        def launch(self, context, job_path, cache_dir=""):
            raise AssertionError(f"trained although nothing changed ({job_path})")

    before = _versions(demo_build, "lora_adapter")
    first = demo_build.mats["lora_adapter"]
    res = dg.materialize([*ASSETS, *CHECKS], selection=dg.AssetSelection.assets("lora_adapter"),
                         partition_key=demo_build.concept, instance=demo_build.instance,
                         resources={**demo_build.resources, "trainer": NoTraining(device="cpu")})
    assert res.success
    mat = res.get_asset_materialization_events()[0].materialization
    assert mat.metadata["reused"].value is True
    assert mat.metadata["path"].value == first.metadata["path"].value
    assert mat.metadata["reused_from_run_id"].value == demo_build.res.run_id
    assert mat.metadata["final_loss"].value == first.metadata["final_loss"].value
    assert mat.tags["dagster/data_version"] == first.tags["dagster/data_version"]  # downstream sees no change
    assert _versions(demo_build, "lora_adapter") == before  # no new version folder
    checks = {c.check_name: c for c in res.get_asset_check_evaluations()}
    assert all(c.passed for c in checks.values())  # the checks run on the reused output
    # ... and the rendering one reads its measurement of these same weights instead of rendering again.
    change, first_change = (c.metadata for c in (checks["changes_base_output"],
                                                  demo_build.checks[("lora_adapter", "changes_base_output")]))
    assert change["measured_before"].value is True and first_change["measured_before"].value is False
    assert change["mean_abs_change"].value == first_change["mean_abs_change"].value

    forced = dg.materialize([*ASSETS, *CHECKS], selection=dg.AssetSelection.assets("lora_adapter"),
                            partition_key=demo_build.concept, instance=demo_build.instance,
                            resources=demo_build.resources, tags={FORCE_RETRAIN_TAG: "true"})
    assert forced.success
    mat = forced.get_asset_materialization_events()[0].materialization
    assert mat.metadata["reused"].value is False
    assert len(_versions(demo_build, "lora_adapter")) == len(before) + 1
    # The base model's validation images for the same prompts and seeds came from the cache, not rendered again.
    metrics = json.loads((Path(mat.metadata["path"].value) / "metrics.json").read_text())
    assert metrics["base_renders_cached"] == len(metrics["validation_prompts"]) * len(metrics["validation_seeds"])


def test_an_output_is_reusable_only_when_intact_and_from_the_same_job_and_code(demo_build, tmp_path):
    import dataclasses
    import shutil

    from assets_pipeline.assets.common import spec_from_snapshot
    from assets_pipeline.training.plan import CODE_VERSION
    from helpers import plan_for
    from assets_pipeline.resources import BaseModelResource, ClipScorerResource, TrainerLauncher
    from assets_pipeline.training.reuse import find_reusable, force_requested

    out = tmp_path / "copy"
    shutil.copytree(_out(demo_build, "dreambooth_model"), out)
    spec = spec_from_snapshot(demo_build.storage, demo_build.concept)
    ref = BaseModelResource().resolve(demo_build.artifacts)
    job = plan_for(demo_build.storage, ref, spec, "dreambooth", run_id="again", input_versions={},
                          trainer=TrainerLauncher(device="cpu"), clip_scorer=ClipScorerResource())
    reuse, why = find_reusable(out, job, CODE_VERSION)
    assert reuse is not None and why.startswith("identical job already trained")
    assert find_reusable(out, job, CODE_VERSION + "x")[1].startswith("trained by code version")
    other = dataclasses.replace(job, config=dataclasses.replace(job.config, learning_rate=job.config.learning_rate * 2))
    assert find_reusable(out, other, CODE_VERSION) == (None, "training inputs changed")
    weights = next(out.rglob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(100)
    reuse, why = find_reusable(out, job, CODE_VERSION)
    assert reuse is None and str(weights) in why and "damaged" in why
    (out / "metrics.json").unlink()
    assert "incomplete" in find_reusable(out, job, CODE_VERSION)[1]
    assert find_reusable(None, job, CODE_VERSION) == (None, "no current output")
    assert not force_requested({}) and force_requested({"assets_pipeline/force_retrain": "TRUE"})
    with pytest.raises(ValueError, match="expected 'true' or 'false'"):
        force_requested({"assets_pipeline/force_retrain": "yes please"})


def test_a_run_that_ends_takes_its_trainer_with_it_and_makes_nothing_current(demo_build):
    """Issue 28, point 1, through the model asset and the trainer resource: while the trainer runs, the run is
    marked failed (what run monitoring does when a run worker is killed); the trainer dies within the watch's poll,
    the step fails naming the run's status, and current.json still names the earlier output."""
    import threading
    import time

    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS
    from assets_pipeline.resources.run_watch import children
    from assets_pipeline.training.reuse import FORCE_RETRAIN_TAG

    asset_dir = demo_build.artifacts / "concepts" / demo_build.concept / "lora_adapter"
    current = (asset_dir / "current.json").read_text()
    before_children = set(children(os.getpid()))
    out = {}

    def materialize():
        out["res"] = dg.materialize([*ASSETS, *CHECKS], selection=dg.AssetSelection.assets("lora_adapter"),
                                    partition_key=demo_build.concept, instance=demo_build.instance,
                                    resources=demo_build.resources, tags={FORCE_RETRAIN_TAG: "true"},
                                    raise_on_error=False)

    thread = threading.Thread(target=materialize)
    thread.start()
    deadline = time.time() + 120
    while not (trainers := [p for p in children(os.getpid()) if p not in before_children]):
        assert thread.is_alive() and time.time() < deadline, "no trainer process started"
        time.sleep(0.05)
    run = demo_build.instance.get_runs(limit=1)[0]
    assert run.status == dg.DagsterRunStatus.STARTED
    demo_build.instance.report_run_failed(run)
    thread.join(timeout=120)
    assert not thread.is_alive()
    res = out["res"]
    assert not res.success
    failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
    assert f"run {run.run_id} ended (FAILURE) while its trainer ran" in str(failure.event_specific_data.error)
    assert not res.get_asset_materialization_events()
    assert (asset_dir / "current.json").read_text() == current
    assert not any(Path(f"/proc/{p}").exists() and "State:\tZ" not in Path(f"/proc/{p}/status").read_text()
                   for p in trainers)


def _rebuild_lora_reusing(demo, named: str):
    """lora_adapter materialized again with a launcher that fails the test if asked to train: it must reuse the
    kept version ``named`` and make it current. Returns the run's log messages."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS
    from assets_pipeline.resources import TrainerLauncher

    class NoTraining(TrainerLauncher):
        def launch(self, context, job_path, cache_dir=""):
            raise AssertionError(f"trained although an identical output is kept ({job_path})")

    pointer = demo.artifacts / "concepts" / demo.concept / "lora_adapter" / "current.json"
    res = dg.materialize([*ASSETS, *CHECKS], selection=dg.AssetSelection.assets("lora_adapter"),
                         partition_key=demo.concept, instance=demo.instance,
                         resources={**demo.resources, "trainer": NoTraining(device="cpu")})
    assert res.success
    mat = res.get_asset_materialization_events()[0].materialization
    assert mat.metadata["reused"].value is True and mat.metadata["path"].value.endswith(named)
    assert json.loads(pointer.read_text()) == {"path": named, "run_id": res.run_id}
    return [entry.user_message for entry in demo.instance.all_logs(res.run_id)]


def test_a_lost_current_json_is_found_again_among_the_kept_versions(demo_build):
    """Issue 28, point 7: current.json deleted, an intact output of the identical job on disk: it is reused and
    made current again, no training."""
    pointer = demo_build.artifacts / "concepts" / demo_build.concept / "lora_adapter" / "current.json"
    named = json.loads(pointer.read_text())["path"]
    pointer.unlink()
    logged = _rebuild_lora_reusing(demo_build, named)
    assert any(f"{named}, kept among the versions, is an intact output of this same job" in m for m in logged)


def test_an_output_a_blocking_check_failed_on_is_never_reused(demo_build):
    """Issue 28, point 2: NaN weights (as an older version saved them) reused by every rerun. Once weights_finite
    fails on an output, it is marked, and the next build trains again instead of reusing it."""
    import dagster as dg
    import torch
    from safetensors.torch import load_file, save_file

    from assets_pipeline.definitions import ASSETS, CHECKS
    from assets_pipeline.hashing import sha256_file
    from assets_pipeline.training.reuse import CHECKS_FAILED, SUMS_FILE

    pointer = demo_build.artifacts / "concepts" / demo_build.concept / "lora_adapter" / "current.json"
    out = pointer.parent / json.loads(pointer.read_text())["path"]
    weights = out / "pytorch_lora_weights.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, weights)
    # SHA256SUMS rewritten as well: the file is intact as written, only its values are not finite.
    sums = (out / SUMS_FILE).read_text().splitlines()
    (out / SUMS_FILE).write_text("".join(
        f"{sha256_file(weights)}  {line.split('  ', 1)[1]}\n" if line.endswith(weights.name) else line + "\n"
        for line in sums))

    def build():
        res = dg.materialize([*ASSETS, *CHECKS], selection=dg.AssetSelection.assets("lora_adapter"),
                             partition_key=demo_build.concept, instance=demo_build.instance,
                             resources=demo_build.resources, raise_on_error=False)
        checks = {c.check_name: c for c in res.get_asset_check_evaluations()}
        return res.get_asset_materialization_events()[0].materialization, checks

    mat, checks = build()
    assert mat.metadata["reused"].value is True and not checks["weights_finite"].passed
    failed = json.loads((out / CHECKS_FAILED).read_text())
    assert json.loads(failed["weights_finite"]["metadata"]["nonfinite_values"]) == {
        weights.name: tensors[name].numel()}
    # Trained again, or (when an earlier test of this module kept another intact output of this same job) that
    # one made current: never the marked one.
    mat, checks = build()
    assert mat.metadata["path"].value != str(out) and checks["weights_finite"].passed
    assert json.loads(pointer.read_text())["path"] != out.name


def test_a_second_run_of_a_job_in_training_waits_without_its_slot_and_reuses_that_output(demo_build, tmp_path):
    """Issue 28, point 4: a second run of a job another run was training held a gpu slot idle while its trainer
    waited on the job lock, then trained again to a second version. Now the step sees the lock taken before it
    launches anything, gives its slot back (a retry: Dagster frees a pool slot while a step waits to retry), and
    on retry reuses what the first run wrote."""
    import subprocess
    import sys
    import threading
    import time

    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS
    from assets_pipeline.resources import TrainerLauncher

    class NoTraining(TrainerLauncher):
        def launch(self, context, job_path, cache_dir=""):
            raise AssertionError(f"trained although the same job was being trained ({job_path})")

    asset_dir = demo_build.artifacts / "concepts" / demo_build.concept / "lora_adapter"
    pointer = asset_dir / "current.json"
    current = asset_dir / json.loads(pointer.read_text())["path"]
    identity = json.loads((current / "lineage.json").read_text())["job_identity"]
    lock = asset_dir / ".checkpoints" / f"{identity[:16]}.lock"
    # The "first run": it holds the job's lock, and its output is not there yet.
    aside = tmp_path / "aside"
    aside.mkdir()
    versions = [p for p in asset_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for p in versions:
        p.rename(aside / p.name)
    pointer.unlink()
    lock.parent.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys\n"
        f"f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0)\n"
        "f.write(':\\nfirst-run\\n'); f.flush(); print('held', flush=True); sys.stdin.read()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    before = {r.run_id for r in demo_build.instance.get_runs()}
    out = {}
    thread = threading.Thread(target=lambda: out.update(res=dg.materialize(
        [*ASSETS, *CHECKS], selection=dg.AssetSelection.assets("lora_adapter"), partition_key=demo_build.concept,
        instance=demo_build.instance, resources={**demo_build.resources, "trainer": NoTraining(device="cpu")},
        raise_on_error=False)))
    thread.start()
    try:
        deadline = time.time() + 120
        while True:  # until the step has given its slot back to wait for a retry
            runs = [r for r in demo_build.instance.get_runs() if r.run_id not in before]
            if runs and any(e.dagster_event and e.dagster_event.event_type_value == "STEP_UP_FOR_RETRY"
                            for e in demo_build.instance.all_logs(runs[0].run_id)):
                break
            assert thread.is_alive() and time.time() < deadline
            time.sleep(0.1)
        # The first run finishes: its output appears, its trainer lets go of the lock.
        for p in versions:
            (aside / p.name).rename(p)
    finally:
        holder.communicate(timeout=30)
    thread.join(timeout=120)
    res = out["res"]
    assert res.success
    mat = res.get_asset_materialization_events()[0].materialization
    assert mat.metadata["reused"].value is True and mat.metadata["path"].value == str(current)
    logged = [e.user_message for e in demo_build.instance.all_logs(res.run_id)]
    assert any("run first-run is training this same job" in m and "gives its gpu slot back" in m for m in logged)
    assert json.loads(pointer.read_text())["path"] == current.name


def test_a_damaged_current_json_is_recovered_as_a_lost_one(demo_build):
    """Issue 28, point 11: a truncated current.json failed the model asset with a bare JSONDecodeError. It is now
    a warning naming the file, and recovered as a lost one is: the intact kept output of the identical job is made
    current again, no training."""
    pointer = demo_build.artifacts / "concepts" / demo_build.concept / "lora_adapter" / "current.json"
    named = json.loads(pointer.read_text())["path"]
    pointer.write_text(pointer.read_text()[:12])
    logged = _rebuild_lora_reusing(demo_build, named)
    assert any(m.startswith(f"{pointer}: not valid JSON, damaged or cut short") and "this run rewrites it" in m
               for m in logged)
    assert any(f"{pointer} is damaged (not valid JSON" in m and f"{named}, kept among the versions" in m
               for m in logged)
