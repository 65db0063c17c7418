"""How the one training loop runs fast: execution settings, not training config.

None of these changes what is learned (they are not part of a job's identity), only how fast and in how much
memory: ``torch.compile`` of the networks each step runs (whole or by block), channels_last, fused AdamW, cuDNN's
algorithm trials, the micro-batch that fits the card, how often the loop syncs with the host to log. Each
defaults to ``auto``: on where it helps (CUDA), off where it does not (CPU; cuDNN's trials are off on both until
a card shows they pay). The trainer resource sets them; the job carries them to the trainer.

Compiled kernels are persisted as a content-addressed artifact (``torch.compiler.save_cache_artifacts``) keyed
by everything that shapes the compiled graphs, so the next training on the same base model, card and batch
starts warm. The micro-batch probe's answer is cached the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from assets_pipeline.hashing import digest

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "none", "regional", "full")
SWITCH = ("auto", "on", "off")
# Regional compilation (https://docs.pytorch.org/tutorials/recipes/regional_compilation.html): diffusers marks
# the U-Net's repeated transformer blocks (``_repeated_blocks``); its ResNet blocks repeat as much and carry most
# of SD's convolution work, so they are compiled too, and so are the CLIP text encoder's layers when it runs
# every step. Everything between them runs eagerly.
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")


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
    precompiled_regions: str = field(default="auto", metadata={"help": (
        "Regional compilation only: compile each distinct block graph ahead of time with its guards "
        "(torch's experimental torch.compile(...).aot_compile) and persist the graphs beside the kernels, so "
        "that a warm start skips Dynamo's tracing and AOTAutograd as well (PrecompiledRegions). 'on' uses "
        "them (and compile = 'auto' then compiles by block); 'auto' = 'off' until a card measures the warm "
        "start with them (`scripts/gpu_bench.sh lora_precompiled`).")})
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
        for name in ("channels_last", "fused_optimizer", "adapter_input_casts", "cudnn_benchmark",
                     "precompiled_regions"):
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
            raise ValueError(f"unknown performance settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """The settings resolved for one run on one device."""

    cuda: bool
    compile: str  # none | regional | full
    backend: str
    channels_last: bool
    fused_optimizer: bool
    adapter_input_casts: bool  # PEFT's input casts kept under mixed precision
    cudnn_benchmark: bool
    precompiled_regions: bool  # regional graphs compiled ahead of time and persisted with their guards
    probe_micro_batch: bool
    log_every: int


def auto_compile(perf: Performance, cuda: bool, passes: int, warm: Callable[[str], bool], processes: int = 1,
                 shapes: int = 1) -> str:
    """What ``compile = 'auto'`` compiles for a run of ``passes`` forward and backward passes (optimizer steps x
    gradient accumulation: what compiling speeds up): nothing on a CPU or in a short run; on CUDA the whole
    networks (``full``: the fastest step measured) in one process, ``regional`` in several (a whole compiled
    backward hands DDP every gradient at its end, so the all-reduce overlaps none of it; compiled blocks hand
    them over block by block) or with ``precompiled_regions = 'on'`` (whose graphs are blocks). A mode whose
    kernels are persisted (``warm(mode)``) is used from ``compile_min_steps_warm`` passes, the preferred mode
    first; a cold compile from ``compile_min_steps``. Each distinct batch shape (aspect bucket) compiles its own
    graphs, so both thresholds count per shape."""
    if not cuda:
        return "none"
    by_block = processes > 1 or perf.precompiled_regions == "on"
    preferred, other = ("regional", "full") if by_block else ("full", "regional")
    for mode in (preferred, other):
        if warm(mode) and passes >= perf.compile_min_steps_warm * shapes:
            return mode
    return preferred if passes >= perf.compile_min_steps * shapes else "none"


def resolve(perf: Performance, cuda: bool, steps: int, accumulation: int,
            compile_cache_warm: Callable[[str], bool] = lambda mode: False, processes: int = 1,
            shapes: int = 1) -> Plan:
    """The settings for one run of ``steps`` optimizer steps of ``accumulation`` micro-batches each:
    ``compile_cache_warm(mode)`` says whether that mode's kernels are persisted for this run's graphs;
    ``processes`` data-parallel processes; ``shapes`` distinct batch shapes (buckets)."""
    def on(value: str) -> bool:
        return cuda if value == "auto" else value == "on"

    mode = perf.compile
    if mode == "auto":
        mode = auto_compile(perf, cuda, steps * accumulation, compile_cache_warm, processes, shapes)
    return Plan(cuda=cuda, compile=mode, backend=perf.compile_backend, channels_last=on(perf.channels_last),
                fused_optimizer=on(perf.fused_optimizer), adapter_input_casts=perf.adapter_input_casts == "on",
                cudnn_benchmark=cuda and perf.cudnn_benchmark == "on",
                precompiled_regions=mode == "regional" and perf.precompiled_regions == "on",
                probe_micro_batch=cuda and perf.micro_batch == "auto" and accumulation > 1, log_every=perf.log_every)


def configure_backends(cuda: bool, cudnn_benchmark: bool) -> None:
    """TF32 for what stays fp32 on CUDA; cuDNN's algorithm trials as the plan says (fixed shapes every step)."""
    import torch

    torch.backends.cudnn.benchmark = cudnn_benchmark
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_module(module, mode: str, backend: str, blocks: tuple[str, ...] = REGIONAL_BLOCKS) -> int:
    """Compile ``module`` in place (``nn.Module.compile``: state-dict keys unchanged, so saving, checkpoints and
    ``unwrap_model`` see the plain module); ``regional`` compiles each submodule whose class is named in
    ``blocks``. Returns the number of compiled regions."""
    import torch

    if mode == "none":
        return 0
    # Each distinct block shape is its own graph (SD 1.5's U-Net has ~20); the default limit of 8 recompiles
    # per code object would silently fall back to eager for the rest.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    if mode == "full":
        module.compile(backend=backend, dynamic=False)
        return 1
    count = 0
    for sub in module.modules():
        if type(sub).__name__ in blocks:
            sub.compile(backend=backend, dynamic=False)
            count += 1
    if not count:
        raise ValueError(f"regional compilation found none of {blocks} in {type(module).__name__}; "
                         "use compile = 'full' or 'none'")
    return count


def skip_adapter_input_casts(modules) -> Callable[[], None]:
    """Turn off PEFT's cast of each adapted layer's input to the adapter weights' dtype (its
    ``cast_input_dtype_enabled``, what ``peft.helpers.disable_input_dtype_casting`` sets) in ``modules``; returns
    the function that turns it back on. Only for a forward under autocast: there the adapter's matmul runs in
    the autocast dtype whatever the input's, so the cast of a bf16 activation to the fp32 master weights was a
    lossless bf16 -> fp32 -> bf16 round trip (two extra kernels and ~12 bytes an element, forward and backward,
    per adapted layer). DoRA layers keep it: their weight norm takes the input's dtype."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [sub for m in modules for sub in m.modules()
              if isinstance(sub, BaseTunerLayer) and not any(getattr(sub, "use_dora", {}).values())
              and getattr(sub, "cast_input_dtype_enabled", False)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False

    def restore() -> None:
        for layer in layers:
            layer.cast_input_dtype_enabled = True

    return restore


def compile_counters() -> dict[str, float]:
    """torch.compile's process-wide diagnostics now (``torch._dynamo.utils``): seconds in Dynamo's tracing and in
    the backend (forward, backward), graphs compiled, and hits and misses of Inductor's FX-graph cache and of
    AOTAutograd's cache. :func:`compile_delta` of two snapshots is what a run compiled: on a warm start the
    misses say what the persisted kernels did not cover."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = {k: sum(v) for k, v in compilation_time_metrics.items()}
    backend = seconds.get("OutputGraph.call_user_compiler", 0.0)  # inside Dynamo's compile_inner
    return {"graphs": counters["stats"]["unique_graphs"],
            "dynamo_s": seconds.get("_compile.compile_inner", 0.0) - backend, "backend_forward_s": backend,
            "backend_backward_s": seconds.get("compile_fx.<locals>.bw_compiler", 0.0),
            "fxgraph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
            "aot_autograd_cache_hits": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_autograd_cache_misses": counters["aot_autograd"]["autograd_cache_miss"]}


def compile_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 2) for k in after}


def device_signature() -> dict[str, Any]:
    """What compiled kernels and memory limits depend on besides the model: torch, CUDA, the card."""
    import torch

    sig = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        sig.update(gpu=props.name, gpu_memory=props.total_memory, capability=f"{props.major}.{props.minor}")
    return sig


def shape_fingerprint(modules: dict[str, Any]) -> str:
    """The trained network's structure: every parameter's name, shape, dtype and whether it trains (a LoRA rank,
    a ControlNet branch or another base model all change it; the weights' values do not)."""
    return digest({name: [type(m).__name__] + [(n, tuple(p.shape), str(p.dtype), p.requires_grad)
                                               for n, p in m.named_parameters()]
                   for name, m in modules.items()})


class CompileCache:
    """Persisted compiled kernels for one graph signature, under ``<cache_dir>/compile/<key>.bin``."""

    def __init__(self, cache_dir: str | None, key: str):
        self.path = Path(cache_dir) / "compile" / f"{key}.bin" if cache_dir else None
        self.key = key

    @property
    def warm(self) -> bool:
        return self.path is not None and self.path.is_file()

    def load(self) -> bool:
        import torch

        if not self.warm:
            return False
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as e:  # a cache from an incompatible build is a miss, never a failed training
            info, why = None, f"{type(e).__name__}: {e}"
        else:
            why = "torch could not read it"
        if info is None:  # torch returns None for bytes it cannot read (truncated, another torch's format)
            log.warning("compile cache %s is unusable (%s); compiling from scratch and replacing it", self.path, why)
            return False
        return True

    def save(self) -> int:
        """Write what this process compiled; returns the bytes written (0 when nothing was compiled)."""
        import torch

        from assets_pipeline.store import write_bytes_atomic

        if self.path is None:
            return 0
        artifacts = torch.compiler.save_cache_artifacts()
        if not artifacts:
            return 0
        data, _info = artifacts
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.path, data)
        return len(data)


def _identity(x):
    return x


def _first_line(e: Exception) -> str:
    """An exception as one short line for stats and logs (torch's compile errors run to pages)."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class PrecompiledRegions:
    """Warm starts without Dynamo for regional compilation (``performance.precompiled_regions``).

    A warm start from :class:`CompileCache` still runs Dynamo, which traces each distinct block graph again on
    the host in every new process (the kernels it then finds are cached). Here each distinct graph is compiled
    ahead of time instead (torch's experimental ``torch.compile(fullgraph=True).aot_compile``, which packages
    the graph's kernels with Dynamo's guards) on the first call that no stored graph's guards accept, and the
    graphs are persisted under ``<cache_dir>/compile/<key>.aot``. A later process loads them and each block
    call runs the first graph whose guards accept it: its shapes, dtypes, strides, grad and autocast state and
    the module attributes the graph read (PEFT's flags among them). A call none accepts compiles one more.

    Guards that cannot be serialized (the identity of code objects and of imported modules' globals, which
    are new objects in every process) are left out of the stored graphs, so the key this cache is stored under
    also carries the versions of torch, diffusers, transformers and PEFT, whose code the graphs were traced
    from. A block with hooks, or a graph that cannot be compiled whole, takes the ordinary lazy path
    (``fallbacks`` says which and why)."""

    def __init__(self, path: Path | None, backend: str):
        self.path, self.backend = path, backend
        self.graphs: dict[str, list] = {}  # block class -> its torch._dynamo.aot_compile.AOTCompiledFunction's
        self.loaded = self.compiled = 0
        self.compile_s = 0.0
        self._saved = 0  # self.compiled when last saved
        self.fallbacks: dict[str, str] = {}  # block class -> why it is compiled the ordinary way
        self.unsaved: dict[str, str] = {}  # block class -> why one of its graphs could not be saved

    @staticmethod
    def unsupported() -> str | None:
        """Why this torch cannot precompile regions (None when it can): it needs ``aot_compile`` and guard
        filters that see each guard's derived types."""
        import torch

        try:
            from torch._dynamo.aot_compile import AOTCompiledFunction  # noqa: F401
            from torch._dynamo.types import GuardFilterEntry
        except ImportError as e:
            return f"torch's ahead-of-time compilation, which torch {torch.__version__} lacks ({e})"
        if "derived_guard_types" not in getattr(GuardFilterEntry, "__annotations__", {}):
            return f"guard filters that see derived guard types, which torch {torch.__version__} lacks"
        # torch 2.11 has the module above but no aot_compile on a compiled function (seen on the H200's image:
        # every block fell back with "'function' object has no attribute 'aot_compile'").
        if not hasattr(torch.compile(_identity, fullgraph=True), "aot_compile"):
            return f"torch.compile(...).aot_compile, which torch {torch.__version__} lacks"
        return None

    @staticmethod
    def key_parts() -> dict[str, str]:
        import diffusers
        import peft
        import torch
        import transformers

        return {"torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__}

    @staticmethod
    def _guard_filter(entries):
        from torch._dynamo.guards import CheckFunctionManager

        unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
        return [not (e.is_global or e.guard_type in unsupported or unsupported & set(e.derived_guard_types or ()))
                for e in entries]

    def load(self) -> int:
        """Read the persisted graphs; returns how many (0 when there are none or they are unusable, logged)."""
        import pickle

        from torch._dynamo.aot_compile import AOTCompiledFunction

        if self.path is None or not self.path.is_file():
            return 0
        try:
            blobs = pickle.loads(self.path.read_bytes())
            self.graphs = {name: [AOTCompiledFunction.deserialize(b) for b in graphs] for name, graphs in blobs.items()}
        except Exception as e:  # another torch's format, a truncated file: a miss, never a failed training
            log.warning("precompiled regions %s are unusable (%s: %s); compiling them again and replacing them",
                        self.path, type(e).__name__, e)
            self.graphs = {}
        self.loaded = sum(map(len, self.graphs.values()))
        return self.loaded

    def save(self) -> int:
        """Write every graph this process holds (loaded and new) if it compiled any since the last save; returns the
        bytes written (0 when there was nothing new)."""
        import pickle

        from torch._dynamo.aot_compile import AOTCompiledFunction

        from assets_pipeline.store import write_bytes_atomic

        if self.path is None or self.compiled == self._saved:
            return 0
        self._saved = self.compiled
        blobs: dict[str, list[bytes]] = {}
        for name, graphs in self.graphs.items():
            blobs[name] = []
            for graph in graphs:
                try:
                    blobs[name].append(AOTCompiledFunction.serialize(graph).serialized_data)
                except Exception as e:  # this graph is compiled again next time; the others are kept
                    self.unsaved[name] = _first_line(e)
                    log.warning("a precompiled %s graph cannot be saved (%s); the next run compiles it again",
                                name, self.unsaved[name])
        data = pickle.dumps(blobs)
        write_bytes_atomic(self.path, data)
        return len(data)

    def install(self, module, blocks: tuple[str, ...] = REGIONAL_BLOCKS) -> int:
        """Route each block of ``module`` through the graphs (:meth:`load` them first, or they are compiled anew);
        call after :func:`compile_module` (regional), whose lazily compiled call stays the fallback. Returns the
        number of blocks routed."""
        count = 0
        for sub in module.modules():
            if type(sub).__name__ in blocks and sub._compiled_call_impl is not None:
                sub._compiled_call_impl = self._dispatcher(sub, sub._compiled_call_impl)
                count += 1
        return count

    def _dispatcher(self, sub, lazy):
        import time

        import torch

        name = f"{type(sub).__module__}.{type(sub).__qualname__}"
        forward = type(sub).forward
        last = [0]  # the graph this block ran last: tried first

        def call(*args, **kwargs):
            # The stored graphs are traced from the class's forward, without hooks: a block with hooks, or whose
            # forward was replaced on the instance (accelerate's offload hooks do that), runs the ordinary way.
            if (sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks
                    or "forward" in sub.__dict__):
                self.fallbacks.setdefault(name, "the block has hooks or its own forward")
                return lazy(*args, **kwargs)
            graphs = self.graphs.setdefault(name, [])
            n = len(graphs)
            for i in [last[0]] + [j for j in range(n) if j != last[0]] if n else ():
                graph = graphs[i]
                if graph.guard_check(sub, *args, **kwargs):
                    last[0] = i
                    return graph.fn(sub, *args, **kwargs)
            if name in self.fallbacks:
                return lazy(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                graph = torch.compile(forward, fullgraph=True, dynamic=False, backend=self.backend,
                                      options={"guard_filter_fn": self._guard_filter}
                                      ).aot_compile(((sub, *args), kwargs))
            except Exception as e:  # a graph break or an unserializable guard: this block class runs lazily
                self.fallbacks[name] = _first_line(e)
                log.warning("precompiling %s failed (%s); it is compiled the ordinary way", name,
                            self.fallbacks[name])
                return lazy(*args, **kwargs)
            finally:
                self.compile_s += time.perf_counter() - t0
            graphs.append(graph)
            self.compiled += 1
            last[0] = len(graphs) - 1
            return graph.fn(sub, *args, **kwargs)

        return call

    def stats(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "compiled": self.compiled, "compile_s": round(self.compile_s, 2),
                "fallbacks": dict(self.fallbacks), "unsaved": dict(self.unsaved)}


class StepProfiler:
    """torch.profiler over a run's last steps (``profile_steps``), written atomically into ``folder``:
    ``trace.json.gz`` (Perfetto, chrome://tracing), ``ops.txt`` (ops and kernels by self time on the device, or on
    the CPU without CUDA) and ``summary.json`` (wall time, device-busy time and their ratio)."""

    def __init__(self, folder: Path, steps: int, cuda: bool):
        self.folder, self.steps, self.cuda = folder, steps, cuda
        self._prof, self._t0 = None, 0.0

    def start(self) -> None:
        import time

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
        import time

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


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def probe_micro_batch(try_batch, candidates: list[int], extra_bytes: int, fraction: float) -> tuple[int, dict]:
    """The largest candidate micro-batch whose forward+backward peak, plus ``extra_bytes`` (optimizer states not
    yet allocated), stays under ``fraction`` of the card's memory. ``try_batch(b)`` runs one eager step."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    tried = {}
    for b in candidates:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            try_batch(b)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        except torch.OutOfMemoryError:
            tried[b] = "out of memory"
            continue
        finally:
            torch.cuda.empty_cache()
        tried[b] = round((peak + extra_bytes) / 2**30, 2)
        if peak + extra_bytes <= fraction * total:
            return b, {"tried_gib": tried, "card_gib": round(total / 2**30, 2)}
    return candidates[-1], {"tried_gib": tried, "card_gib": round(total / 2**30, 2)}


def flash_attention_status(modules: dict[str, Any], dtype) -> str:
    """Whether every attention layer runs PyTorch SDPA and SDPA's flash kernel accepts its head size and dtype
    (checked by forcing the flash backend on a tensor of that shape; a refusal raises)."""
    import torch
    import torch.nn.functional as F

    processors, head_dims = set(), set()
    for m in modules.values():
        for sub in m.modules():
            if type(sub).__name__ == "Attention" and hasattr(sub, "processor"):
                processors.add(type(sub.processor).__name__)
                head_dims.add(sub.to_q.out_features // sub.heads)
    if not head_dims:
        return "no attention layers"
    if not torch.cuda.is_available() or dtype not in (torch.float16, torch.bfloat16):
        return f"sdpa ({', '.join(sorted(processors))}); flash needs CUDA and fp16/bf16"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    refused = []
    for d in sorted(head_dims):
        q = torch.randn(1, 2, 64, d, device="cuda", dtype=dtype)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                F.scaled_dot_product_attention(q, q, q)
        except RuntimeError:
            refused.append(d)
    state = "flash" if not refused else f"flash refused head dims {refused}"
    return f"{state} for head dims {sorted(head_dims)} ({', '.join(sorted(processors))})"
