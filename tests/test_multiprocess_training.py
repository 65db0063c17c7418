"""Data-parallel training for real: ``accelerate launch`` with two processes on the CPU (gloo), through the
trainer resource. Only rank 0 writes, the losses are one process's at the same effective batch, a checkpoint
taken by two processes resumes, and stock diffusers loads what they trained."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow

# The demo concept with an effective batch of 2 (1 x 2 accumulation steps): two processes split it, one
# micro-batch each per step (training/loop.py, per_process_batch). LoRA warms its LR up and decays it, so the
# comparisons below cover the schedule (in optimizer steps, whatever the number of processes) too.
SECTIONS = """
[lora]
gradient_accumulation_steps = 2
lr_scheduler = "linear"
lr_warmup_steps = 2

[dreambooth]
gradient_accumulation_steps = 2
"""


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory, built_models):
    """The demo dataset, and lora_adapter materialized through Dagster with the trainer resource at
    ``num_processes: 2`` (its checks included): the uninterrupted two-process run the tests compare against."""
    import dagster as dg

    from assets_pipeline.assets.common import spec_from_snapshot
    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.demo_data import DEMO_CONCEPT, write_demo_concept
    from assets_pipeline.resources import PipelineStorage, TrainerLauncher
    from tests.conftest import link_models

    root = tmp_path_factory.mktemp("multiprocess")
    artifacts = link_models(built_models, root / "artifacts")
    write_demo_concept(root / "data")
    with open(root / "data" / DEMO_CONCEPT / "concept.toml", "a") as f:
        f.write(SECTIONS)
    storage = PipelineStorage(data_root=str(root / "data"), artifact_root=str(artifacts))
    dataset = ["raw_images", "captioned_images", "filtered_images", "clip_scored_images", "class_images",
               "vae_latents"]
    selection = dg.AssetSelection.assets(*dataset).without_checks() | dg.AssetSelection.assets("lora_adapter")
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", [DEMO_CONCEPT])
        res = dg.materialize([*ASSETS, *CHECKS], selection=selection, partition_key=DEMO_CONCEPT,
                             instance=instance, resources={**default_resources(), "storage": storage,
                                                           "trainer": TrainerLauncher(num_processes=2, device="cpu")})
    assert res.success
    mat = next(e.materialization for e in res.get_asset_materialization_events()
               if e.materialization.asset_key.to_user_string() == "lora_adapter")
    checks = {c.check_name: c.passed for c in res.get_asset_check_evaluations()
              if c.asset_key.to_user_string() == "lora_adapter"}
    return SimpleNamespace(root=root, storage=storage, artifacts=artifacts,
                           spec=spec_from_snapshot(storage, DEMO_CONCEPT),
                           base=artifacts / "base_models" / "embedded-tiny-sd-v1", lora=mat, lora_checks=checks,
                           lora_out=Path(mat.metadata["path"].value))


def _job(ctx, method: str, name: str, num_processes: int, **overrides):
    """A trainer job (the one the model asset would write), with its own output and checkpoint folders."""
    from helpers import plan_for
    from assets_pipeline.resources import BaseModelResource, ClipScorerResource, TrainerLauncher

    trainer = TrainerLauncher(num_processes=num_processes, device="cpu")
    job = plan_for(ctx.storage, BaseModelResource().resolve(ctx.artifacts), ctx.spec, method, run_id=name,
                          input_versions={}, trainer=trainer, clip_scorer=ClipScorerResource(),
                          overrides=overrides or None)
    # One denoising step per validation render: these tests look at the weights, not the pictures.
    job = dataclasses.replace(job, output_dir=str(ctx.root / name / "out"),
                              checkpoint_dir=str(ctx.root / name / "ckpt"), validation_inference_steps=1)
    path = ctx.root / f"{name}.json"
    job.save(path)
    return job, trainer.command(path)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_written_once_and_whole(out: Path, stderr: str, method: str) -> None:
    """Rank 0 alone logged and wrote: one progress line, one output folder, no temporaries or checkpoints left,
    every weights file as SHA256SUMS lists it."""
    from assets_pipeline.hashing import sha256_file

    assert stderr.count(f"training {method} for") == 1 and stderr.count(f"wrote {out}") == 1, stderr[-3000:]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        assert sha256_file(out / name) == digest
    lineage = json.loads((out / "lineage.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert lineage["num_processes"] == 2 and metrics["training_speed"]["num_processes"] == 2
    assert metrics["training_speed"]["gradient_accumulation"] == 1  # each process: half of the 1 x 2 batch


def test_per_process_batch_keeps_the_effective_batch(tmp_path):
    from assets_pipeline.resources import TrainerLauncher
    from helpers import make_job
    from assets_pipeline.training.step import per_process_batch

    assert per_process_batch(1, 2, 2) == (1, 1)  # the accumulation splits: the same micro-batches as one process
    assert per_process_batch(4, 3, 2) == (2, 3)  # else the micro-batch does
    assert per_process_batch(2, 4, 1) == (2, 4)
    for micro, accum, n in [(1, 2, 2), (4, 3, 2), (3, 2, 3), (2, 4, 4)]:
        m, a = per_process_batch(micro, accum, n)
        assert m * a * n == micro * accum and m <= micro
    with pytest.raises(ValueError, match="gradient_accumulation_steps = 2"):
        per_process_batch(1, 1, 2)
    # The model asset fails on it before any trainer process starts.
    make_job("lora", {"train_batch_size": 1, "gradient_accumulation_steps": 1}).save(tmp_path / "job.json")
    with pytest.raises(ValueError, match="cannot be split over 2 processes"):
        TrainerLauncher(num_processes=2, device="cpu").launch(None, tmp_path / "job.json")


def test_the_other_ranks_wait_for_their_own_rank_0_to_take_the_job_lock(tmp_path, monkeypatch):
    """Not at their first collective, which times out while another trainer of the job holds the lock."""
    from helpers import make_job
    from assets_pipeline.training.checkpoints import job_lock

    job = make_job("lora", checkpoint_dir=str(tmp_path))

    def as_rank(rank: int, port: int) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))

    as_rank(0, 1001)
    other = job_lock(job)
    other.__enter__()  # another launch's rank 0 trains this job
    entered = threading.Event()

    def rank_1() -> None:
        with job_lock(job):
            entered.set()

    as_rank(1, 1002)
    waiting = threading.Thread(target=rank_1, daemon=True)
    waiting.start()
    assert not entered.wait(1.5)
    other.__exit__(None, None, None)
    assert not entered.wait(1.5), "the lock is free, but its own rank 0 has not taken it yet"
    as_rank(0, 1002)
    with job_lock(job):
        assert entered.wait(5)
    waiting.join(5)


def test_two_processes_train_lora_through_dagster(two_procs):
    """The materialization's own checks pass, and the output loads into a stock diffusers pipeline."""
    from diffusers import StableDiffusionPipeline

    assert two_procs.lora_checks and all(two_procs.lora_checks.values()), two_procs.lora_checks
    assert two_procs.lora.metadata["num_processes"].value == 2
    out = two_procs.lora_out
    assert json.loads((out / "lineage.json").read_text())["num_processes"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(two_procs.base, local_files_only=True)
    pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a photo of sks scene", num_inference_steps=1, height=64, width=64, output_type="np").images.shape == (
        1, 64, 64, 3)


def test_two_processes_train_dreambooth_and_rank_0_alone_writes(two_procs):
    from diffusers import StableDiffusionPipeline

    job, cmd = _job(two_procs, "dreambooth", "dreambooth-2", 2, max_train_steps=2)
    assert cmd[2:4] == ["accelerate.commands.launch", "--num_processes"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = Path(job.output_dir)
    _assert_written_once_and_whole(out, run.stderr, "dreambooth")
    assert not any(Path(job.checkpoint_dir).glob("*/step-*"))
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.sample_size > 0


def test_two_processes_learn_what_one_process_learns_at_the_same_effective_batch(two_procs):
    """One process at 1 x 2 (two accumulated micro-batches a step) against two at 1 x 1 each: the same job.

    What is comparable: the effective batch stays the config's, and the accumulation steps are split over the
    processes, so rank r runs exactly the micro-batches (rows and noise: both are functions of the sample
    index) that one process runs as micro-batch r. DDP's mean of the two gradients is then the one process's
    accumulated gradient, and the logged loss (all-reduced) its mean of two micro-batch losses, up to float
    rounding. The two micro-batches' losses differ by ~1e-2, so a loop that logged rank 0's loss alone, or
    doubled the effective batch (each process taking the whole batch), misses the 1e-5 tolerance by orders of
    magnitude; the weights (LoRA updates ~1e-4 a step) catch a wrong split or an LR schedule that runs at
    another pace with two processes."""
    job, _ = _job(two_procs, "lora", "lora-1", 1)
    one = _train_in_one_process(job)
    assert one.resumed_from == 0 and one.stats["gradient_accumulation"] == 2
    _assert_learned_the_same(one, job, two_procs.lora_out)


def _train_in_one_process(job):
    import torch

    from assets_pipeline.training.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each trainer process under torchrun (OMP_NUM_THREADS=1): quick on a busy CPU
    try:
        state = train(job)
    finally:
        torch.set_num_threads(threads)
    assert state.num_processes == 1
    return state


def _assert_learned_the_same(one, job, two_out: Path) -> None:
    """One process's losses and LoRA weights are the two-process output's, up to float rounding."""
    import torch

    two = [float(line.split(",")[1]) for line in (two_out / "loss.csv").read_text().splitlines()[1:]]
    assert len(one.losses) == len(two) and len(set(two)) == len(two)
    assert one.losses == pytest.approx(two, rel=1e-5, abs=0)
    saved = one.method.save(one.models, None, Path(job.checkpoint_dir), one.cfg, one.ctx)
    a, b = _tensors(saved[0]), _tensors(two_out / saved[0].name)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    # LoRA's up weights start at zero: they moved by far more than the tolerance.
    assert max(float(b[k].abs().max()) for k in b if ".lora.up." in k) > 1e-4


def test_a_two_process_checkpoint_resumes_and_matches(two_procs):
    """SIGKILL of the launcher's process group once a checkpoint exists (the trainer processes die with their
    launcher), then the same command again: it resumes, and ends with the uninterrupted run's weights and
    losses, bit for bit. The checkpoint resumes in one process too."""
    import fcntl
    import re

    import torch

    job, cmd = _job(two_procs, "lora", "lora-killed", 2)
    ckpts = Path(job.checkpoint_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (done := list(ckpts.glob("*/step-*/losses.json"))):
        assert proc.poll() is None, "training finished before a checkpoint could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    # A checkpoint is whole once it has its name: both processes' RNG states were in before the rename.
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {
        p.name for p in done[0].parent.iterdir()}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The job lock comes free (rank 0 died: a trainer that outlived its launcher would hold it until it had
    # written the output), and nothing was written.
    with open(next(ckpts.glob("*.lock"))) as f:
        deadline = time.time() + 30
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() < deadline, "a trainer process outlived its launcher"
                time.sleep(0.1)
    assert not Path(job.output_dir).exists()

    # A copy of the checkpoint resumes in one process as well: the LR schedule counts optimizer steps, and the
    # batches and noise are functions of the sample index, whatever the number of processes.
    single, _ = _job(two_procs, "lora", "lora-killed-1", 1)
    shutil.copytree(ckpts, single.checkpoint_dir, ignore=shutil.ignore_patterns("*.lock"))
    one = _train_in_one_process(single)
    assert one.resumed_from > 0
    _assert_learned_the_same(one, single, two_procs.lora_out)

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = int(re.search(r"resumed from checkpoint at step (\d+)", rerun.stderr).group(1))
    out = Path(job.output_dir)
    assert 0 < resumed < json.loads((out / "lineage.json").read_text())["steps"]
    _assert_written_once_and_whole(out, rerun.stderr, "lora")
    a = _tensors(two_procs.lora_out / "pytorch_lora_weights.safetensors")
    b = _tensors(out / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (two_procs.lora_out / "loss.csv").read_text() == (out / "loss.csv").read_text()
    assert not any(ckpts.glob("*/step-*")), "checkpoints are removed once the output exists"
