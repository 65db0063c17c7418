"""The clock of one training run: the first step (the warm-up: compilation and the persisted kernels' reading and
writing) timed on its own, the steady rate after it with validations left out, an ETA from that rate, and the
run's last steps recorded with ``torch.profiler`` (``performance.profile_steps``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class StepTimer:
    """Times steps ``start`` .. ``steps`` of a run. The loop calls :meth:`before` and :meth:`after` around each
    optimizer step and times validations with :meth:`paused`; :meth:`stats` gives the numbers."""

    def __init__(self, start: int, steps: int, cuda: bool, profile_steps: int = 0, profile_dir: Path | None = None,
                 record: bool = True, progress: Callable[[str], None] = log.info):
        import torch

        self.start, self.steps, self.cuda, self.progress = start, steps, cuda, progress
        # profile_steps: the last steps run under torch.profiler (``record``: this process writes the trace); the
        # steady rate ends before them. They need the first step and a timed one before them.
        self.profile_from = self.profiler = self.profile = None
        if profile_steps and steps - start >= profile_steps + 2:
            self.profile_from = steps - profile_steps
            if record:
                self.profiler = StepProfiler(profile_dir, profile_steps, cuda)
        elif profile_steps:
            progress(f"not profiling: profile_steps = {profile_steps} needs {profile_steps + 2} steps to go "
                     f"(the first, one timed, then the profiled ones), this run has {steps - start}")
        self.warmup_s = self.t_steady = self.t_steady_end = self.steady_validation_s = self.t_end = None
        self.validation_s = 0.0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def before(self, step: int) -> None:
        """At the first profiled step the steady window closes (a CPU-GPU sync point) and the profiler starts."""
        if step != self.profile_from:
            return
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.t_steady_end, self.steady_validation_s = time.perf_counter(), self.validation_s
        if self.profiler is not None:
            self.profiler.start()

    def after(self, done: int, step_loss, first_step: Callable[[float], float]) -> None:
        """After optimizer step ``done``. The first step waits for its loss (a sync: the first step pays
        compilation, and cuDNN's trials if on, and is timed on its own); ``first_step(seconds)`` then saves what
        it compiled and returns the seconds spent reading and writing persisted kernels, which the warm-up
        includes. The steady rate starts after it, so it never includes the save."""
        if self.profiler is not None and done == self.steps:  # before the last log, validation and checkpoint
            self.profile = self.profiler.stop()
            self.progress(f"profiled the last {self.profile['steps']} steps: {self.profile['step_ms']} ms a step"
                          + (f", GPU busy {self.profile['device_busy']:.0%}"
                             if self.profile["device_busy"] is not None else "")
                          + f" ({self.profiler.folder}: trace.json.gz, ops.txt)")
        if self.warmup_s is None:
            float(step_loss)
            first_step_s = time.perf_counter() - self.t0
            self.warmup_s = first_step_s + first_step(first_step_s)
            self.t_steady = time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent here (validation during training) is left out of the steady rate."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.validation_s += time.perf_counter() - t

    def eta(self, done: int) -> str:
        """", ETA 3m12s" from the steady rate (steps after the first, which pays compilation), or "" before one."""
        if self.t_steady is None or done - self.start <= 1 or done >= self.steps:
            return ""
        left = (time.perf_counter() - self.t_steady) / (done - self.start - 1) * (self.steps - done)
        return f", ETA {int(left // 60)}m{int(left % 60):02d}s"

    def stop(self) -> None:
        """The run's last step is done."""
        self.t_end = time.perf_counter()

    def stats(self, images_per_step: int) -> dict[str, Any]:
        """images_per_s (the steady rate: the steps after the first, up to the profiled ones, validations left
        out; None where no step was timed), warmup_s, train_s, and the profile when one was recorded."""
        end, validation_s = self.t_steady_end, self.steady_validation_s
        if end is None:
            end, validation_s = self.t_end, self.validation_s
        steady = end - self.t_steady - validation_s if self.t_steady else 0.0
        steady_steps = (self.profile_from or self.steps) - self.start - 1
        out = {
            "images_per_s": round(images_per_step * steady_steps / steady, 2) if steady_steps > 0 and steady else None,
            "warmup_s": round(self.warmup_s, 2) if self.warmup_s is not None else None,
            "train_s": round(self.t_end - self.t0, 2),
        }
        if self.profile is not None:
            out["profile"] = self.profile
        return out


class StepProfiler:
    """torch.profiler over a run's last steps (``profile_steps``), written atomically into ``folder``:
    ``trace.json.gz`` (Perfetto, chrome://tracing), ``ops.txt`` (ops and kernels by self time on the device, or on
    the CPU without CUDA) and ``summary.json`` (wall time, device-busy time and their ratio)."""

    def __init__(self, folder: Path, steps: int, cuda: bool):
        self.folder, self.steps, self.cuda = folder, steps, cuda
        self._prof, self._t0 = None, 0.0

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()
        if self.cuda:
            torch.cuda.synchronize()

    def stop(self) -> dict[str, Any]:
        import gzip
        import shutil

        import torch

        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        events = self._prof.key_averages()
        busy = None
        if self.cuda:  # the kernels' (and copies') own time, as the table's "Self CUDA time total" sums it
            from torch.autograd import DeviceType

            busy = sum(e.self_device_time_total for e in events
                       if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
        summary = {"steps": self.steps, "wall_s": round(wall, 3),
                   "step_ms": round(1000 * wall / self.steps, 2),
                   "device_busy_s": round(busy, 3) if busy is not None else None,
                   "device_busy": round(busy / wall, 3) if busy is not None and wall else None}
        tmp = self.folder.with_name(f".{self.folder.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self._prof.export_chrome_trace(str(tmp / "trace.json"))
        with open(tmp / "trace.json", "rb") as raw, gzip.open(tmp / "trace.json.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)  # a tenth of the size; Perfetto and chrome://tracing read it as is
        (tmp / "trace.json").unlink()
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        (tmp / "ops.txt").write_text(events.table(sort_by=sort, row_limit=60) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.folder.exists():
            shutil.rmtree(self.folder)
        tmp.rename(self.folder)
        return summary


