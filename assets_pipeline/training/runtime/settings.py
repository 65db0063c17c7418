"""The trainer's speed settings (``performance``): how the one loop runs, not what it learns.

None of these changes what is learned (they are not part of a job's identity), only how fast and in how much
memory: ``torch.compile`` of the networks each step runs (whole or by block), channels_last, fused AdamW, cuDNN's
algorithm trials, the micro-batch that fits the card, how often the loop syncs with the host to log. Each
defaults to ``auto``: on where it helps (CUDA), off where it does not (CPU; cuDNN's trials are off on both until
a card shows they pay). The trainer resource sets them (a Dagster Config generated from :class:`Performance`, so
the launchpad shows each key's help); the job carries them to the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

COMPILE_MODES = ("auto", "none", "regional", "full")
SWITCH = ("auto", "on", "off")

@dataclass(frozen=True)
class Performance:
    compile: str = field(default="auto", metadata={"help": (
        "torch.compile of the networks every step runs (U-Net, ControlNet, a trained text encoder): 'full' (each "
        "whole network: the fastest step measured), 'regional' (each repeated transformer/ResNet/CLIP layer: "
        "less warm-up, and DDP's gradient all-reduce still overlaps the backward), 'none'. 'auto' = on CUDA, "
        "'full' in one process and 'regional' in several, when the run has at least compile_min_steps steps per "
        "batch shape, or compile_min_steps_warm per shape and persisted kernels for the mode; none on CPU.")})
    compile_min_steps: int = field(default=2000, metadata={"help": (
        "'auto' compiles a cold run (no persisted kernels for its graphs) only from this many steps (forward and "
        "backward passes: optimizer steps x gradient accumulation) per distinct batch shape (each aspect bucket "
        "compiles its own graphs). Measured on an H200 (SD 1.5 LoRA, batch 16, 2026-11-27, docs/benchmarks.md): "
        "a cold whole-network compile cost ~120 s more than an eager first step and saved 73 ms of each 179 ms "
        "step, repaid from ~1,650 steps (regional: ~108 s and 57 ms, ~1,900 steps); the default leaves a margin, "
        "as cold compiles varied by 10% between runs. The kernels persist: later runs of the same shape start "
        "warm.")})
    compile_min_steps_warm: int = field(default=300, metadata={"help": (
        "'auto' compiles a run whose kernels are persisted (warm cache) from this many steps (passes, as above) "
        "per batch shape. In the same measurement a warm regional start cost 15.3 s more than an eager first "
        "step, repaid after ~270 steps (a warm whole-network start is still to be measured: "
        "scripts/gpu_bench.sh lora_full).")})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend ('aot_eager' tests)."})
    channels_last: str = field(default="auto", metadata={"help": "NHWC convolutions: 'auto' = on CUDA only."})
    fused_optimizer: str = field(default="auto", metadata={"help": "Fused AdamW kernel: 'auto' = on CUDA only."})
    cudnn_benchmark: str = field(default="auto", metadata={"help": (
        "torch.backends.cudnn.benchmark: cuDNN times its algorithms for each convolution shape on first use "
        "(forward and both backward passes) and keeps the fastest. The trials run in every process's first "
        "step, compiled or not, and are not persisted. 'auto' = off. The fastest steps measured (the plain "
        "compiled loop, docs/benchmarks.md) ran without them. With them, the trainer's first step was 7 s (H100, "
        "LoRA) to 19 s (H200, DreamBooth) longer than that of the reference loop, which runs without them; without "
        "them the H200's eager LoRA first step took 2.45 s (15.0 s with them, an earlier run). 'on' A/Bs them "
        "(`scripts/gpu_bench.sh lora_eager_ab first_step_ab`).")})
    adapter_input_casts: str = field(default="auto", metadata={"help": (
        "PEFT casts each adapted layer's input to the adapter's fp32 weights; under mixed precision autocast "
        "casts it straight back to bf16/fp16 for the matmul, a round trip over the whole activation per layer "
        "(eager runs; Inductor removes it). 'auto' = 'off' = skip that cast under mixed precision (the same "
        "numbers; DoRA keeps it); 'on' = PEFT's casts as they are.")})
    micro_batch: str = field(default="auto", metadata={"help": (
        "'auto' = on CUDA with gradient accumulation, probe the largest micro-batch that fits the card (cached per "
        "card, model and method) and keep the configured effective batch; 'configured' = train_batch_size as set.")})
    memory_fraction: float = field(default=0.85, metadata={"help": (
        "Share of the card's memory the probed micro-batch may use (optimizer states included); the rest is "
        "headroom for fragmentation and the compiled graphs.")})
    profile_steps: int = field(default=0, metadata={"help": (
        "Record the run's last N steps with torch.profiler (CPU and CUDA activity) into the output's profile/: "
        "a Perfetto/Chrome trace (trace.json.gz), the ops by device time (ops.txt), ms a step and how busy the GPU "
        "was (summary.json). The steady images/s then counts the steps before them. 0 = off.")})
    log_every: int = field(default=10, metadata={"help": (
        "Steps between loss logs: reading a loss is a device-to-host sync, so the GPU is never made to wait "
        "for the host in between.")})

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"performance.compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        for name in ("channels_last", "fused_optimizer", "adapter_input_casts", "cudnn_benchmark"):
            if getattr(self, name) not in SWITCH:
                raise ValueError(f"performance.{name} must be one of {SWITCH}, got {getattr(self, name)!r}")
        if self.micro_batch not in ("auto", "configured"):
            raise ValueError(f"performance.micro_batch must be 'auto' or 'configured', got {self.micro_batch!r}")
        if not 0.1 <= self.memory_fraction <= 1.0:
            raise ValueError(f"performance.memory_fraction must be in [0.1, 1], got {self.memory_fraction}")
        if self.log_every < 1:
            raise ValueError(f"performance.log_every must be >= 1, got {self.log_every}")
        for name in ("compile_min_steps", "compile_min_steps_warm", "profile_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"performance.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Performance:
        raw = dict(raw or {})
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown performance settings {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """The settings resolved for one run on one device. What compiles is decided later, once the micro-batch is
    known (:func:`compile_mode`): the compiled graphs and their persisted kernels depend on it."""

    cuda: bool
    backend: str
    channels_last: bool
    fused_optimizer: bool
    adapter_input_casts: bool  # PEFT's input casts kept under mixed precision
    cudnn_benchmark: bool
    probe_micro_batch: bool
    log_every: int


def plan(perf: Performance, cuda: bool, accumulation: int) -> Plan:
    """The settings for a run of ``accumulation`` micro-batches per optimizer step (as configured, before the
    micro-batch probe, which only runs with accumulation to split)."""
    def on(value: str) -> bool:
        return cuda if value == "auto" else value == "on"

    return Plan(cuda=cuda, backend=perf.compile_backend, channels_last=on(perf.channels_last),
                fused_optimizer=on(perf.fused_optimizer), adapter_input_casts=perf.adapter_input_casts == "on",
                cudnn_benchmark=cuda and perf.cudnn_benchmark == "on",
                probe_micro_batch=cuda and perf.micro_batch == "auto" and accumulation > 1, log_every=perf.log_every)


def auto_compile(perf: Performance, cuda: bool, passes: int, warm: Callable[[str], bool], processes: int = 1,
                 shapes: int = 1) -> str:
    """What ``compile = 'auto'`` compiles for a run of ``passes`` forward and backward passes (optimizer steps x
    gradient accumulation: what compiling speeds up): nothing on a CPU or in a short run; on CUDA the whole
    networks (``full``: the fastest step measured) in one process, ``regional`` in several (a whole compiled
    backward hands DDP every gradient at its end, so the all-reduce overlaps none of it; compiled blocks hand
    them over block by block). A mode whose kernels are persisted (``warm(mode)``) is used from
    ``compile_min_steps_warm`` passes, the preferred mode first; a cold compile from ``compile_min_steps``. Each
    distinct batch shape (aspect bucket) compiles its own graphs, so both thresholds count per shape."""
    if not cuda:
        return "none"
    preferred, other = ("regional", "full") if processes > 1 else ("full", "regional")
    for mode in (preferred, other):
        if warm(mode) and passes >= perf.compile_min_steps_warm * shapes:
            return mode
    return preferred if passes >= perf.compile_min_steps * shapes else "none"


def compile_mode(perf: Performance, cuda: bool, steps: int, accumulation: int,
                 warm: Callable[[str], bool] = lambda mode: False, processes: int = 1, shapes: int = 1) -> str:
    """``compile`` for a run of ``steps`` optimizer steps of ``accumulation`` micro-batches each: as set, or
    :func:`auto_compile`'s choice. ``warm(mode)`` says whether that mode's kernels are persisted for this run's
    graphs; ``processes`` data-parallel processes; ``shapes`` distinct batch shapes (buckets)."""
    if perf.compile != "auto":
        return perf.compile
    return auto_compile(perf, cuda, steps * accumulation, warm, processes, shapes)
