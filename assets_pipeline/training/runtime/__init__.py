"""How the one training loop runs fast, behind one object, so the loop reads as a loop.

:class:`Runtime` applies the speed settings (``settings.py``: compile modes, channels_last, fused AdamW, cuDNN's
trials, PEFT's input casts, the micro-batch probe) and measures the run. The loop calls it at three points: once
the networks are placed (:meth:`Runtime.prepare`: probe the micro-batch, decide what compiles, load persisted
kernels, compile), after the first step (:meth:`Runtime.first_step_done`: save what compiled), and at the end
(:meth:`Runtime.finish`: the run's speed numbers). Its :class:`~.timer.StepTimer` owns the warm-up, the steady
rate and the profiled window. Nothing here changes what is learned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from assets_pipeline.hashing import digest
from assets_pipeline.training.runtime import backends, compilation
from assets_pipeline.training.runtime.settings import Performance, compile_mode, plan
from assets_pipeline.training.runtime.timer import StepTimer

log = logging.getLogger(__name__)
PROFILE_DIR = "profile"  # performance.profile_steps' trace, under the checkpoint folder and then in the output


class Runtime:
    """The speed settings of one run on one device, ``processes`` data-parallel processes of which this is one;
    ``accumulation`` is the configured accumulation per process (the micro-batch probe may change it)."""

    def __init__(self, perf: Performance, *, cuda: bool, accumulation: int, processes: int, precision: str,
                 weight_dtype, cache_dir: str = "", progress: Callable[[str], None] = log.info):
        import torch

        self.perf, self.cuda, self.processes = perf, cuda, processes
        self.precision, self.weight_dtype, self.cache_dir, self.progress = precision, weight_dtype, cache_dir, progress
        # What compiled kernels and memory limits depend on besides the model: torch, CUDA, the card.
        self.signature = compilation.device_signature()
        self.plan = plan(perf, cuda, accumulation)
        backends.configure_backends(cuda, self.plan.cudnn_benchmark)
        # Under mixed precision (autocast) PEFT's input casts are lossless round trips: skipped unless asked for.
        self.casts = self.plan.adapter_input_casts or weight_dtype == torch.float32
        self.compile, self.cache, self.cache_state, self.cache_io_s = "none", None, "off", 0.0
        self.probe = self._restore_casts = self._compiled_before = None
        self.shapes: tuple = ()
        self.attention = ""

    @property
    def channels_last(self) -> bool:
        return self.plan.channels_last

    @property
    def log_every(self) -> int:
        return self.plan.log_every

    def fused_optimizer(self, cfg) -> bool:
        return self.plan.fused_optimizer and cfg.optimizer == "adamw"

    def prepare(self, job, method, models, data, cfg, roles, params, steps: int, micro: int, accumulation: int,
                accelerator) -> tuple[int, int]:
        """Once the networks are placed, before the optimizer exists: PEFT's casts, the micro-batch probe, what
        compiles (with persisted kernels loaded) and the compilation itself. Returns (micro-batch, accumulation)."""
        import torch

        # The networks every step runs forward and backward through, trained or frozen (textual inversion's
        # gradients flow through the frozen U-Net): these are compiled, and their structure keys the kernels.
        running = models.networks()
        sig, network = self.signature, compilation.shape_fingerprint(running)
        if not self.casts:
            self._restore_casts = backends.skip_adapter_input_casts(running.values())
        if self.plan.probe_micro_batch:
            from assets_pipeline.training.runtime.memory import choose_micro_batch

            share = micro * accumulation  # this process's part of the effective batch
            micro, self.probe = choose_micro_batch(job, method, models, data, cfg, share, roles, params,
                                                   self.weight_dtype, digest(sig, network, self.casts),
                                                   self.perf.memory_fraction, self.channels_last, self.progress)
            if self.processes > 1:  # every process must run as many micro-batches (gradient syncs): the smallest
                micro = int(accelerator.gather(torch.tensor([micro], device=accelerator.device)).min())
            accumulation = share // micro

        def kernels(mode: str) -> compilation.CompileCache:
            # What the compiled graphs depend on: the network's structure, the batch, precision and the device.
            return compilation.CompileCache(self.cache_dir or None, digest(
                "compiled-train-step", sig, network, job.method, self.precision, micro, len(roles), data.shapes,
                mode, self.channels_last, cfg.gradient_checkpointing, self.casts))

        self.shapes = data.shapes
        self.compile = compile_mode(self.perf, self.cuda, steps, accumulation, lambda mode: kernels(mode).warm,
                                    self.processes, len(data.shapes))
        self.cache = kernels(self.compile)
        if self.compile != "none":
            t_load = time.perf_counter()
            self.cache_state = "warm" if self.cache.load() else "cold"
            self.cache_io_s = time.perf_counter() - t_load  # reading the kernels; writing new ones is added later
            for module in running.values():
                compilation.compile_module(module, self.compile, self.plan.backend)
            self._compiled_before = compilation.compile_counters()
        self.attention = backends.flash_attention_status({models.family.denoiser.component: models.denoiser},
                                                         self.weight_dtype)
        return micro, accumulation

    def describe(self) -> str:
        """For the run's first log line."""
        return f"compile {self.compile} (cache {self.cache_state}), channels_last {self.channels_last}"

    def timer(self, start: int, steps: int, checkpoint_root: Path, main_process: bool) -> StepTimer:
        return StepTimer(start, steps, self.cuda, self.perf.profile_steps, checkpoint_root / PROFILE_DIR,
                         record=main_process, progress=self.progress)

    def first_step_done(self, first_step_s: float) -> float:
        """After the first step, which compiled what it ran: persist the kernels of a cold cache. Returns the
        seconds spent reading and writing persisted kernels (the warm-up includes them)."""
        if self.cache_state == "cold":
            t_save = time.perf_counter()
            saved = self.cache.save()
            save_s = time.perf_counter() - t_save
            self.cache_io_s += save_s
            where = self.cache.path.parent if self.cache.path else "nowhere (no cache_dir)"
            self.progress(f"compiled in {first_step_s:.1f} s; saved {saved / 2**20:.1f} MiB of kernels to {where} "
                          f"in {save_s:.1f} s")
        return self.cache_io_s

    def finish(self, timer: StepTimer, *, images_per_step: int, micro: int, accumulation: int, cfg) -> dict[str, Any]:
        """After the last step: save the kernels of the buckets compiled after the first step's save (so the next
        run is warm for all), put PEFT's input casts back, and return the run's speed numbers."""
        import torch

        if self.cache_state == "cold" and len(self.shapes) > 1 and (saved := self.cache.save()):
            self.progress(f"saved {saved / 2**20:.1f} MiB of kernels for {len(self.shapes)} bucket shapes to "
                          f"{self.cache.path.parent}")
        if self._restore_casts is not None:  # the trained modules forward outside autocast as PEFT made them
            self._restore_casts()
        stats = {
            **timer.stats(images_per_step),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None,
            "micro_batch": micro, "gradient_accumulation": accumulation, "compile": self.compile,
            "compile_cache": self.cache_state, "compile_cache_io_s": round(self.cache_io_s, 2),
            "channels_last": self.channels_last, "fused_optimizer": self.fused_optimizer(cfg),
            "adapter_input_casts": self.casts, "cudnn_benchmark": self.plan.cudnn_benchmark,
            "optimizer": cfg.optimizer, "attention": self.attention, "precision": self.precision,
            "device": self.signature.get("gpu", "cpu"), "num_processes": self.processes,
        }
        if self.probe is not None:
            stats["micro_batch_probe"] = self.probe
        if self._compiled_before is not None:  # where the compile time went, and whether a warm cache covered all
            stats["compile_stats"] = compilation.compile_delta(self._compiled_before, compilation.compile_counters())
        if cfg.validation_steps:
            stats["validation_s"] = round(timer.validation_s, 2)
        return stats
