"""What a warm compiled start still pays: Dynamo's tracing of the LoRA step's U-Net, per choice of compiled regions.

    python benchmarks/bench_compile_trace.py --shapes tiny
    python benchmarks/bench_compile_trace.py --shapes sd15      # ~3 minutes on 2 CPU cores

Persisted kernels (``torch.compiler.save_cache_artifacts``, what makes a run warm) cover the backend's work:
AOTAutograd, Inductor's code generation and Triton's compilation. Dynamo still traces every graph in every new
process, on the host, whatever the device. So this runs on a CPU. Each region set runs in its own process. The
U-Net gets the LoRA method's adapters, frozen weights in bf16 and the adapter's fp32 master weights (the loop's
placement), and runs one forward + backward under bf16 autocast. It is compiled with the ``eager`` backend,
so the timed first step is Dynamo's part plus an eager step. Region sets:

- ``regional``: the trainer's block set (``performance.REGIONAL_BLOCKS``; ``compile = "auto"`` with several
  processes);
- ``transformer``: diffusers' ``_repeated_blocks`` for the U-Net (``BasicTransformerBlock`` alone);
- ``resnet``: the ResNet blocks alone;
- ``full``: the whole U-Net, one graph (``auto`` in one process).

Prints one JSON line per set: regions compiled, distinct graphs, Dynamo's seconds, the first and second step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETS = ("regional", "transformer", "resnet", "full")


def run_set(name: str, shapes: str, side: int, adapters: bool) -> dict:
    import torch
    from torch._dynamo.utils import compilation_time_metrics, counters

    from assets_pipeline.training.runtime.compilation import REGIONAL_BLOCKS, compile_module

    from bench_step_traffic import build_unet  # this script's folder is on sys.path (run as a script)

    unet = build_unet(shapes, adapters=adapters)
    if not adapters:  # something must train: the U-Net's own weights (DreamBooth's step, no PEFT layers)
        unet.requires_grad_(True)
    blocks = {"regional": REGIONAL_BLOCKS, "transformer": ("BasicTransformerBlock",),
              "resnet": ("ResnetBlock2D",), "full": ()}[name]
    regions = compile_module(unet, "full" if name == "full" else "regional", "eager", blocks)
    torch.compile(lambda a: a.sin(), backend="eager")(torch.randn(2))  # Dynamo's one-off start, not timed below
    base = sum(compilation_time_metrics.get("_compile.compile_inner", []))
    graphs0 = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, side, side, generator=g)
    embeds = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    added = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled embedding and the six time ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]],
                                                                 dtype=torch.float32)}}
    t = torch.tensor([500])

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(latents, t, embeds, **added).sample
        pred.float().square().mean().backward()
        return time.perf_counter() - t0

    first = step()
    second = step()
    dynamo = sum(compilation_time_metrics.get("_compile.compile_inner", [])) - base
    return {"set": name, "shapes": shapes, "adapters": adapters, "regions": regions,
            "graphs": counters["stats"]["unique_graphs"] - graphs0, "dynamo_s": round(dynamo, 2),
            "first_step_s": round(first, 2), "second_step_s": round(second, 2), "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=("tiny", "sd15", "sdxl"), default="tiny")
    ap.add_argument("--latent-side", type=int, default=8, help="latent height and width (tracing does not depend on it)")
    ap.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    ap.add_argument("--no-adapters", action="store_true",
                    help="no LoRA adapters; the U-Net's own weights train (DreamBooth's step): PEFT's share")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one set, in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_set(args.one, args.shapes, args.latent_side, not args.no_adapters)), flush=True)
        return 0
    for name in args.sets:  # each in a fresh process: Dynamo's caches and counters start empty
        cmd = [sys.executable, __file__, "--one", name, "--shapes", args.shapes, "--latent-side", str(args.latent_side),
               *(["--no-adapters"] if args.no_adapters else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(json.dumps({"set": name, "error": proc.stderr[-2000:]}), flush=True)
            return proc.returncode
        print(proc.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
