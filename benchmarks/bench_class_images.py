"""Class-image throughput: diffusers' prior-generation default against this project's defaults.

    python benchmarks/bench_class_images.py --shapes tiny                 # CPU smoke run: the embedded model
    python benchmarks/bench_class_images.py --shapes sd15 --count 96      # GPU: SD 1.5 shapes, random weights

reference: what examples/dreambooth/train_dreambooth.py does with --with_prior_preservation: the model's own
           scheduler (PNDM for SD 1.5), 50 steps, sample_batch_size 4, fp16 on CUDA (fp32 on CPU), each image
           saved as a JPEG in the loop.
project:   generate_class_images with ClassImageConfig() defaults (real-model settings) into a temporary
           ItemCache: the code path the class_images asset runs (DPM-Solver++ 25 steps, batch 16 on CUDA / 4 on
           CPU, bf16 on CUDA, PNGs).

Each variant generates one extra batch first, in the same call: warmup_s is the time to its images (model build,
device transfer, compilation, first kernels), and images_per_s counts the --count images after it. Each variant
runs in its own process, so peak memory is its own (CUDA peak allocated during generation, else peak RSS) and
nothing compiled by one helps the other. Prints one JSON line per run, then the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

PROMPT = "a photo of a dog"


def run_one(variant: str, shapes: str, count: int, resolution: int, device: str, compile_: str) -> dict:
    import hashlib
    import resource
    import tempfile

    import torch

    from assets_pipeline.models.load import resolve_device
    from assets_pipeline.models.embedded import build_pipeline
    from assets_pipeline.stages.class_images import ClassImageConfig, generate_class_images
    from assets_pipeline.store import ItemCache

    device = resolve_device(device)
    cuda = device.startswith("cuda")
    marks = []  # time after each batch

    def build(dtype):
        pipe = build_pipeline(shapes, device).to(dtype)
        if cuda:  # peak memory of generation (weights + activations), not of the fp32 build before the cast
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        return pipe

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "project":
            cfg = ClassImageConfig(compile={"auto": "auto", "true": True, "false": False}[compile_])
            batch, dtype = cfg.resolved_batch_size(device), cfg.sampling(device, quick=False).dtype
            generate_class_images(build, "bench", PROMPT, batch + count, resolution, cfg,
                                  ItemCache(Path(tmp), "class_images", ".png"), quick=False, device=device,
                                  progress=lambda done, total: marks.append(time.perf_counter()))
        else:
            batch, dtype = 4, "float16" if cuda else "float32"
            pipe = build(getattr(torch, dtype))
            pipe.set_progress_bar_config(disable=True)
            todo = batch + count
            for start in range(0, todo, batch):
                # train_dreambooth.py: pipeline(example["prompt"]).images, no generator, then a sha1-named JPEG
                for img in pipe([PROMPT] * min(batch, todo - start), height=resolution, width=resolution).images:
                    img.save(Path(tmp) / f"{hashlib.sha1(img.tobytes()).hexdigest()}.jpg")
                marks.append(time.perf_counter())
    end = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    peak = torch.cuda.max_memory_allocated(device) if cuda else rss
    return {"method": "class_images", "variant": variant, "shapes": shapes, "resolution": resolution,
            "batch": batch, "dtype": dtype, "count": count, "images_per_s": round(count / (end - marks[0]), 3),
            "warmup_s": round(marks[0] - t0, 2), "peak_mem_gib": round(peak / 2**30, 2),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--count", type=int, default=None, help="timed images per run (default: 8 tiny, 64 sd15)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="image side in px (default: 512 sd15; 32 tiny, which keeps the CPU run under a minute: "
                         "the embedded model's 64 px costs 7x more, mostly 1024-token attention)")
    ap.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N'")
    ap.add_argument("--compile", choices=["auto", "true", "false"], default="auto", help="project's U-Net compile")
    ap.add_argument("--variants", nargs="+", default=["reference", "project"], choices=["reference", "project"])
    ap.add_argument("--json-out", help="also append every JSON line to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single variant in this process
    args = ap.parse_args()
    count = args.count or (8 if args.shapes == "tiny" else 64)
    resolution = args.resolution or (32 if args.shapes == "tiny" else 512)
    if args.one:
        print(json.dumps(run_one(args.one, args.shapes, count, resolution, args.device, args.compile)))
        return 0
    rows = {}

    def emit(line: str) -> None:
        print(line, flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(line + "\n")

    for variant in args.variants:
        cmd = [sys.executable, __file__, "--one", variant, "--shapes", args.shapes, "--count", str(count),
               "--resolution", str(resolution), "--device", args.device, "--compile", args.compile]
        line = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
        emit(line)
        rows[variant] = json.loads(line)
    if len(rows) == 2:
        ratio = rows["project"]["images_per_s"] / rows["reference"]["images_per_s"]
        emit(json.dumps({"method": "class_images", "ratio_project_over_reference": round(ratio, 2),
                         "device": rows["project"]["device"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
