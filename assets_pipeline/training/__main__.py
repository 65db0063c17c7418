"""The trainer as a program: ``python -m assets_pipeline.training --job job.json``.

Launched by the model assets through Dagster Pipes (logs and the materialization stream back into the run);
from a shell it logs to stderr. Under ``accelerate launch --num_processes N`` it trains data-parallel and the
main process writes the output. ``--job-from-stdin``: started ahead of its job, it imports its libraries, then
reads the job from stdin (resources/spare_trainer.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path


def _pipes(stack: ExitStack):
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    # Under accelerate launch every process inherits the Pipes variables; rank 0 alone talks to Dagster (the
    # others log to stderr, which the run captures too).
    if not PipesEnvVarParamsLoader().is_dagster_pipes_process() or os.environ.get("RANK", "0") != "0":
        return None
    return stack.enter_context(open_dagster_pipes())


def _die_with_launcher(launched: bool = False) -> None:
    """Under ``accelerate launch`` (torchrun) each process trains in its own session, so a launcher killed hard
    (SIGKILL of its process group, a Dagster run terminated) would leave them training on, holding the GPUs
    and the job lock; a trainer launched by a Dagster step (Pipes) likewise outlived a killed step process.
    Linux's parent-death signal ends each with its launcher (prctl(2), PR_SET_PDEATHSIG). A run that ends while
    its step lives on is the step's to notice (resources/run_watch.py)."""
    launched = launched or "TORCHELASTIC_RUN_ID" in os.environ or "DAGSTER_PIPES_CONTEXT" in os.environ
    if not launched or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before the signal was armed
        os._exit(1)


def import_ahead() -> None:
    """What a training imports before its first step, for a trainer started ahead of its job (the libraries and
    the classes their lazy modules load on first use; a family's own classes load when its job needs them)."""
    import accelerate  # noqa: F401
    import open_clip  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from assets_pipeline.training import checkpoints, job, loop, output, validation  # noqa: F401


def wait_for_job() -> int:
    """``--job-from-stdin``: a trainer started ahead (resources/spare_trainer.py). It imports what a training
    needs, then reads one JSON line from stdin: the arguments, the Pipes variables and the working directory its
    launcher would have started a new trainer with. Its stdin closed with no job (the launcher had no use for it)
    ends it quietly."""
    _die_with_launcher(launched=True)  # first: it must die with the step, imports or not
    import_ahead()
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    import json

    order = json.loads(line)
    os.environ.update(order["env"])
    os.chdir(order["cwd"])
    return main(order["argv"])


def main(argv: list[str] | None = None) -> int:
    _die_with_launcher()  # first: importing torch takes seconds
    import torch

    from assets_pipeline.training.job import TrainJob
    from assets_pipeline.training.checkpoints import checkpoint_root, job_lock
    from assets_pipeline.training.loop import train
    from assets_pipeline.training.output import materialization_metadata, write_output

    parser = argparse.ArgumentParser(prog="python -m assets_pipeline.training", description=__doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--job", type=Path, help="job JSON written by a model asset")
    what.add_argument("--pack", nargs="+", type=Path, metavar="JOB",
                      help="several job JSONs (a pack run, assets/packs.py): those that can share a pack train as "
                      "packs, the others alone; each concept's outcome is reported on its own "
                      "(training/pack_trainer.py)")
    parser.add_argument("--pack-size", type=int, default=0, metavar="N",
                        help="with --pack: at most N concepts per pack (0: no limit)")
    args = parser.parse_args(argv)
    # Our progress at INFO; libraries (accelerate's checkpoint chatter, open_clip's loading) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    if args.pack:
        return _main_pack(args.pack, args.pack_size)
    job = TrainJob.load(args.job)
    _compile_caches(job)
    with ExitStack() as stack:
        pipes = _pipes(stack)
        progress = pipes.log.info if pipes else logging.getLogger("trainer").info
        stack.enter_context(job_lock(job, progress))  # released when the output is written (or on a crash)
        state = train(job, progress)
        if not state.is_main_process:
            return 0
        device = "cuda" if job.device != "cpu" and torch.cuda.is_available() else "cpu"
        result = write_output(job, state, device)
        shutil.rmtree(checkpoint_root(job), ignore_errors=True)  # done: nothing left to resume
        progress(f"wrote {job.output_dir}: CLIP-T {result['clip_t']:.4f}, CLIP-I {result['clip_i']:.4f}, "
                 f"mean change vs base {result['mean_abs_change_vs_base']:.4f}")
        if pipes:
            pipes.report_asset_materialization(metadata=materialization_metadata(job, state, result),
                                               data_version=result["weights_version"])
    return 0


def _compile_caches(job) -> None:
    if job.cache_dir:  # a launcher sets them (resources/spare_trainer.py); from a shell, set them here
        from assets_pipeline.training.runtime.compilation import compile_cache_env

        for key, value in compile_cache_env(job.cache_dir).items():
            os.environ.setdefault(key, value)


def _main_pack(paths: list[Path], pack_size: int) -> int:
    """``--pack``: several jobs in this process; each concept's outcome goes to Dagster as a custom message (a pack
    run's step turns it into the concept's materialization), or from a shell into the log."""
    import json

    from assets_pipeline.training.pack_trainer import load_jobs, train_jobs

    jobs = load_jobs(paths)
    _compile_caches(jobs[0])
    with ExitStack() as stack:
        pipes = _pipes(stack)
        progress = pipes.log.info if pipes else logging.getLogger("trainer").info
        if pipes:
            report = pipes.report_custom_message
        else:
            def report(outcome: dict) -> None:
                progress("outcome: " + json.dumps({k: v for k, v in outcome.items() if k != "metadata"}))
        return train_jobs(jobs, pack_size, progress, report)


def exit_now(code: int) -> None:
    """End the trainer without the interpreter's teardown: with torch, diffusers and transformers loaded it takes
    1.6-1.9 s (measured on the 2-core development machine), paid by every training on the path to its step's end.
    Everything the trainer made is complete by now: outputs renamed into place, the job lock released, the
    trackers ended (``end_training``), the Pipes session closed; only the standard streams and log handlers are
    left to flush. A trainer that raised exits the usual way, its traceback printed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(wait_for_job() if sys.argv[1:] == ["--job-from-stdin"] else main())
