"""Backend switches and checks around the step: TF32 and cuDNN's trials, PEFT's input casts under mixed precision,
and whether SDPA's flash kernel takes the model's attention."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def configure_backends(cuda: bool, cudnn_benchmark: bool) -> None:
    """TF32 for what stays fp32 on CUDA; cuDNN's algorithm trials as the plan says (fixed shapes every step)."""
    import torch

    torch.backends.cudnn.benchmark = cudnn_benchmark
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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


def flash_attention_status(modules: dict[str, Any], dtype) -> str:
    """Whether every attention layer runs PyTorch SDPA and SDPA's flash kernel accepts its head size and dtype
    (checked by forcing the flash backend on a tensor of that shape; a refusal raises)."""
    import torch
    import torch.nn.functional as F

    processors, head_dims = set(), set()
    for m in modules.values():
        for sub in m.modules():
            # diffusers' Attention (U-Nets, SD 3.x's joint blocks) and FluxAttention: a processor, to_q and heads
            if hasattr(sub, "processor") and hasattr(sub, "to_q") and hasattr(sub, "heads"):
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
