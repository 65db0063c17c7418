"""What one LoRA training step (U-Net forward + backward under bf16 autocast) asks of memory, by kind of op.

    python benchmarks/bench_step_traffic.py --shapes tiny
    python benchmarks/bench_step_traffic.py --shapes sd15 --latent-side 16      # ~2 minutes on 2 CPU cores

Counts every aten op the step dispatches (a ``TorchDispatchMode`` under autocast and autograd, so autocast's
casts and the backward's ops are in it) and the bytes of the tensors each reads and writes, with PEFT's input
casts kept (``adapter_input_casts = "on"``) and skipped (the default under mixed precision). Runs on the CPU:
CPU autocast runs group/layer norms in bf16 where CUDA's runs them in fp32, so the norms' share differs on a
GPU; the casts' share does not. Views are not counted; matmul/convolution/attention bytes include the weights.
Bytes are what an eager run moves (Inductor fuses casts away), not a time: matmuls and convolutions are bound by
compute, casts by memory bandwidth.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMPUTE = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}
VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "permute", "unsqueeze", "squeeze", "as_strided",
         "detach", "alias", "slice", "select", "split", "chunk", "unbind", "reshape", "split_with_sizes"}


def kind(name: str, dtypes: set) -> str:
    if name in ("_to_copy", "copy_"):
        return "cast" if len(dtypes) > 1 else "copy"
    if name in COMPUTE or "scaled_dot_product" in name:
        return "matmul/conv/attention"
    return "norm" if "norm" in name else "other"


def build_unet(shapes: str, adapters: bool = True):
    """The U-Net of ``shapes`` (tiny: the embedded SD 1.x; sd15, sdxl: random weights) placed as the LoRA loop places
    it: frozen weights in bf16 and, with ``adapters``, the LoRA method's adapters with fp32 master weights."""
    import torch
    from peft import LoraConfig

    from assets_pipeline.models.embedded import SPECS, build_denoiser
    from assets_pipeline.models.families import get_family

    torch.manual_seed(0)
    unet = build_denoiser(shapes)
    unet.requires_grad_(False)
    if adapters:  # the LoRA method's default targets in the family's denoiser
        targets = list(get_family(SPECS[shapes].family).denoiser.lora_targets)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    unet.to(torch.bfloat16)  # frozen weights in bf16, the adapter's fp32 master weights (the loop's _place)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


def measure(unet, batch: int, side: int, skip: bool) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from assets_pipeline.training.runtime.backends import skip_adapter_input_casts

    counts, nbytes = collections.Counter(), collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in VIEWS:
                tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
                k = kind(name, {t.dtype for t in tensors})
                counts[k] += 1
                nbytes[k] += sum(t.numel() * t.element_size() for t in tensors)
            return out

    g = torch.Generator().manual_seed(1)
    cfg = unet.config
    latents = torch.randn(batch, cfg.in_channels, side, side, generator=g, dtype=torch.bfloat16)
    embeds = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g, dtype=torch.bfloat16)
    restore = skip_adapter_input_casts([unet]) if skip else None
    t0 = time.perf_counter()
    try:
        with Count():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = unet(latents, torch.tensor([500] * batch), encoder_hidden_states=embeds).sample
            ((pred.float() - latents.float()) ** 2).mean().backward()
    finally:
        if restore is not None:
            restore()
        unet.zero_grad(set_to_none=True)
    return {"seconds": round(time.perf_counter() - t0, 1), "ops": dict(counts),
            "mib": {k: round(v / 2**20, 1) for k, v in nbytes.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--latent-side", type=int, help="latent height and width (default: the model's sample size)")
    args = ap.parse_args()
    from assets_pipeline.models.families import get_family

    unet = build_unet(args.shapes)
    side = args.latent_side or unet.config.sample_size
    print(f"{args.shapes} U-Net + LoRA r4 on {', '.join(get_family('sd1').denoiser.lora_targets)}, batch {args.batch}, "
          f"latents {side}x{side}, bf16 autocast on the CPU: one forward + backward")
    print(f"{'PEFT input casts':<18} {'kind':<22} {'ops':>6} {'MiB':>10}")
    for label, skip in (("kept", False), ("skipped", True)):
        r = measure(unet, args.batch, side, skip)
        for k in sorted(r["ops"]):
            print(f"{label:<18} {k:<22} {r['ops'][k]:>6} {r['mib'][k]:>10}")
        print(f"{label:<18} {'total':<22} {sum(r['ops'].values()):>6} {round(sum(r['mib'].values()), 1):>10}"
              f"   ({r['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
