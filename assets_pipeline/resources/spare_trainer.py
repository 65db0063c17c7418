"""A trainer process started ahead of its job, its libraries imported while the dataset steps run.

A training is its own process (``python -m assets_pipeline.training``), so the memory it used is returned and a
crash fails only its step. Started when its step begins, that process first spends seconds importing torch,
diffusers, transformers, peft and open_clip (5-9 s on the 2-core development machine: issue 28, point 16). In a
run that executes its steps in one process (the default, in-process executor), this module starts that process
earlier: when the first dataset step finds that the concept's inputs changed (:func:`expect_training`; a run
that reuses everything starts none). The spare imports the libraries, then waits on its stdin for its job. The
model step hands it the same arguments, Pipes variables and working directory it would have given a new process
(:func:`run_trainer`); from there it is the same trainer.

What holds for a trainer holds for a spare:

- It dies with the process that started it: the trainer arms its parent-death signal first thing, and a spare is
  started only from the main thread, which lives as long as that process (the signal follows the thread that
  started a child, not its process).
- A run that ends while the step runs kills it (:func:`pids` is what ``run_watch`` must not count as the step's
  earlier children), and a spare that no training took is killed when the run's resources are torn down
  (:func:`discard`).
- It is used only where it is exactly the process the step would start: the single-process command (not
  ``accelerate launch``, not a launcher's own command) and the same environment, else it is discarded (the step
  logs why) and a new process starts. Every trainer, started ahead or not, gets the environment its run started
  with (:func:`trainer_env`), so what the dataset steps' imports set meanwhile reaches neither.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import dagster as dg

from assets_pipeline.training import TRAINER, TRAINER_ENV

WAIT_FOR_JOB = "--job-from-stdin"
PIPES = "DAGSTER_PIPES_"  # the variables a Pipes session adds, handed to the spare with its job


class _Spare:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.started = time.monotonic()
        self.process = subprocess.Popen([*TRAINER, WAIT_FOR_JOB], env=env, stdin=subprocess.PIPE)


_lock = threading.Lock()
_run_env: dict[str, str] | None = None  # this process's environment when its run (or step) started
_spares = False  # whether a spare may be started
_spare: _Spare | None = None


def trainer_env(extra: Mapping[str, str] | None = None, cache_dir: str | Path | None = None) -> dict[str, str]:
    """The environment a trainer gets, before the Pipes variables: this process's as the run started with it
    (:func:`allow`), not as imports changed it since (importing diffusers sets ``TORCHINDUCTOR_CACHE_DIR`` to a
    folder under /tmp, which the trainer would then take over its cache in the artifact root; controlnet_aux sets
    ``LD_LIBRARY_PATH`` for OpenCV); the current one outside a run. With ``cache_dir`` (the job's), the
    compilers' caches go there unless the run's environment names them."""
    from assets_pipeline.training.runtime.compilation import compile_cache_env

    with _lock:
        base = dict(_run_env) if _run_env is not None else dict(os.environ)
    return {**(compile_cache_env(cache_dir) if cache_dir else {}), **base, **TRAINER_ENV, **(extra or {})}


def allow(spares: bool = True) -> None:
    """The trainer resource's setup (in an in-process run, at the run's start): keep this process's environment
    for the trainers it starts, and let a later :func:`expect_training` start a spare (``spares``: the trainer
    is the single local process a spare can stand for)."""
    global _run_env, _spares
    with _lock:
        _run_env, _spares = dict(os.environ), spares


def allowed() -> bool:
    """Whether this process may start a spare (:func:`allow` was called and no :func:`discard` since)."""
    with _lock:
        return _spares


def expect_training(cache_dir: str | Path, log=None) -> bool:
    """A dataset step found changed inputs, so a training probably follows in this run: start a spare trainer
    if this process may run one and has none. Returns whether one was started. Only from the main thread.
    ``cache_dir``: the artifact root's (the jobs' ``cache_dir``), for the compilers' caches."""
    global _spare
    if threading.current_thread() is not threading.main_thread():
        return False
    env = trainer_env(cache_dir=cache_dir)
    with _lock:
        if not _spares or (_spare is not None and _spare.process.poll() is None):
            return False
        _spare = _Spare(env)
    if log is not None:
        log(f"inputs changed: started a trainer process ahead (pid {_spare.process.pid}) to import its libraries "
            "while the dataset steps run")
    return True


def pids() -> set[int]:
    """The spare's process id while it waits (run_watch kills it with the step's trainer)."""
    with _lock:
        return {_spare.process.pid} if _spare is not None and _spare.process.poll() is None else set()


def discard() -> None:
    """Kill a spare no training took (the run's resources are torn down), and allow no more in this process."""
    global _spare, _run_env, _spares
    with _lock:
        spare, _spare, _run_env, _spares = _spare, None, None, False
    if spare is not None:
        _kill(spare.process)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    if process.stdin is not None:
        process.stdin.close()


def take(command: Sequence[str], env: Mapping[str, str], cwd: str, log=None) -> tuple[subprocess.Popen, float] | None:
    """The spare, handed the job (``command``'s arguments, the Pipes variables in ``env``, ``cwd``), with the
    seconds it was started ahead; None (and the spare killed, the reason passed to ``log``) where it is not
    exactly the process ``command`` would start: another command, another environment, or a spare that died."""
    global _spare
    with _lock:
        spare, _spare = _spare, None
    if spare is None:
        return None
    changed = sorted(k for k in {*spare.env, *env} if spare.env.get(k) != env.get(k) and not k.startswith(PIPES))
    why = ("it is the single-process trainer, this job runs another command" if
           tuple(command[:len(TRAINER)]) != TRAINER else
           f"the environment changed since it started ({', '.join(changed)})" if changed else
           f"it ended (exit {spare.process.returncode})" if spare.process.poll() is not None else None)
    if why is None:
        order = {"argv": list(command[len(TRAINER):]), "env": {k: v for k, v in env.items() if k.startswith(PIPES)},
                 "cwd": cwd}
        try:
            assert spare.process.stdin is not None
            spare.process.stdin.write((json.dumps(order) + "\n").encode())
            spare.process.stdin.close()
            return spare.process, time.monotonic() - spare.started
        except (BrokenPipeError, OSError) as e:  # it died between the poll and the write
            why = f"it could not be handed the job ({e})"
    _kill(spare.process)
    if log is not None:
        log(f"not using the trainer process started ahead (pid {spare.process.pid}): {why}; starting a new one")
    return None


def run_trainer(context, command: Sequence[str], env: Mapping[str, str], message_reader, cache_dir: str = "",
                termination_timeout_s: float = 20, check: bool = True) -> dg.PipesClientCompletedInvocation:
    """``dg.PipesSubprocessClient.run``, except that the spare takes the job where it can: a Pipes session
    (context in a temporary file, messages through ``message_reader``), the trainer's exit code checked, and an
    interrupted step (a run canceled) passing SIGINT on to the trainer. ``check=False`` (a pack, whose concepts
    succeed or fail each on its own): a non-zero exit code does not raise; it is the invocation's ``returncode``."""
    from dagster._core.errors import DagsterExecutionInterruptedError, DagsterPipesExecutionError

    with dg.open_pipes_session(context=context, context_injector=dg.PipesTempFileContextInjector(),
                               message_reader=message_reader) as session:
        full_env = {**trainer_env(env, cache_dir), **session.get_bootstrap_env_vars()}
        cwd = os.getcwd()
        taken = take(command, full_env, cwd, context.log.info)
        if taken is not None:
            process, ahead = taken
            context.log.info(f"the trainer process started {ahead:.1f} s ahead (pid {process.pid}) takes this job")
        else:
            process = subprocess.Popen(list(command), cwd=cwd, env=full_env)
        try:
            process.wait()
            if process.returncode != 0 and check:
                raise DagsterPipesExecutionError(f"External execution process failed with code {process.returncode}")
        except DagsterExecutionInterruptedError:
            context.log.info("[pipes] execution interrupted, sending SIGINT to subprocess.")
            process.send_signal(signal.SIGINT)
            process.wait(timeout=termination_timeout_s)
            raise
    invocation = dg.PipesClientCompletedInvocation(session)
    invocation.returncode = process.returncode
    return invocation
