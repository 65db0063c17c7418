"""Compiling the networks a step runs (``torch.compile``, whole or by block) and persisting the compiled kernels.

The kernels are a content-addressed artifact (``torch.compiler.save_cache_artifacts``) under
``<cache_dir>/compile/<key>.bin``, keyed by everything that shapes the compiled graphs (the network's structure,
batch, precision, mode, the card and torch), so the next training on the same base model, card and batch starts
warm. A cache torch cannot read is a logged miss, never a failed training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from assets_pipeline.hashing import digest

log = logging.getLogger(__name__)

# Regional compilation (https://docs.pytorch.org/tutorials/recipes/regional_compilation.html): diffusers marks
# the U-Net's repeated transformer blocks (``_repeated_blocks``); its ResNet blocks repeat as much and carry most
# of SD's convolution work, so they are compiled too, and so are the CLIP text encoder's layers when it runs
# every step. Everything between them runs eagerly.
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")



def compile_cache_env(cache_dir: str | Path) -> dict[str, str]:
    """The compilers' own on-disk caches inside the artifact root (a job's ``cache_dir``), not /tmp or ~/.triton.
    Set in a trainer's environment before torch._dynamo is imported: importing it fixes some paths and sets
    ``TORCHINDUCTOR_CACHE_DIR`` to its /tmp default where it is unset."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(Path(cache_dir) / "inductor"), "TRITON_CACHE_DIR": str(Path(cache_dir) / "triton")}


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
