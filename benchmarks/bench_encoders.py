"""Encoder throughput on the project's own code paths: VAE encoding of photos (stages.latents._load_pixels on the
image threads: decode, training crop; then _encode_pixels: the VAE), text encoding (stages.latents.encode_text_entries) and CLIP scoring
(stages.scoring.score_images: decode, preprocess, both towers), each batched on the device. Photos are decoded and
preprocessed on the image threads (assets_pipeline/parallel.py; ASSETS_PIPELINE_IMAGE_THREADS=1 for one).
``vae_host`` and ``clip_host`` time that host side alone: the most the rows above could reach with an infinitely
fast device.

    python benchmarks/bench_encoders.py --shapes tiny                       # CPU, seconds: the embedded models
    python benchmarks/bench_encoders.py --shapes sd15 --batch-sizes 8 32    # GPU: SD 1.5 VAE/text, ViT-B-32

tiny = the embedded SD and the embedded CLIP; sd15 = random-weight SD 1.5 shapes (assets_pipeline.models.embedded)
and open_clip's ViT-B-32 (pretrained=None). Photos are random PNGs 1.5x the resolution wide, written once, so the
training crop resizes as it would for a camera photo. Prints one JSON line per (method, batch). peak_mem_gib is
CUDA peak allocated for that run; on the CPU it is the process's peak RSS so far.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

CAPTION = "a photo of sks dog on a sofa"


def write_photos(folder: Path, n: int, resolution: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # Upsampled noise: smooth like a photo, so PNG decoding costs about what a photo's would.
        small = (rng.random((resolution // 8, resolution * 3 // 16, 3)) * 255).astype(np.uint8)
        path = folder / f"photo_{i}.png"
        Image.fromarray(small).resize((resolution * 3 // 2, resolution), Image.BICUBIC).save(path)
        paths.append(str(path))
    return paths


def load_models(shapes: str, device: str, artifacts: Path):
    from assets_pipeline.models.embedded import RESOLUTION, SPECS, build_pipeline
    from assets_pipeline.models.families import get_family
    from assets_pipeline.models.load import Components
    from assets_pipeline.stages.latents import Encoders
    from assets_pipeline.stages.scoring import ClipScorer, ensure_embedded_clip

    pipe, resolution = build_pipeline(shapes, device), RESOLUTION[shapes]
    # What load_encoders returns: the frozen VAE and text encoder on the device, in the dtype they load in (fp32).
    enc = Encoders(lambda: Components(vae_config=pipe.vae.config, scheduler_config=pipe.scheduler.config,
                                      vae=pipe.vae.to(device).eval(),
                                      text_encoders=(pipe.text_encoder.to(device).eval(),),
                                      tokenizers=(pipe.tokenizer,)),
                   vae_fingerprint="bench", text_fingerprint="bench", family=get_family(SPECS[shapes].family),
                   device=device)
    if shapes == "tiny":
        scorer = ClipScorer(f"local-dir:{ensure_embedded_clip(artifacts)}", None, "bench", True, device)
    else:  # open_clip builds ViT-B-32 with random weights when pretrained is None: nothing is downloaded
        scorer = ClipScorer("ViT-B-32", None, "bench", False, device)
    return enc, scorer, resolution


def measure(fn, batch: int, iters: int, cuda: bool) -> tuple[float, float]:
    """(images/s, peak GiB) over ``iters`` calls after one warm-up call (lazy loads, kernel selection)."""
    import resource

    import torch

    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()  # each returns CPU arrays, so every call already ends in a sync
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return batch * iters / elapsed, peak / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--iters", type=int, default=5, help="timed calls per (method, batch), after one warm-up")
    ap.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N'")
    ap.add_argument("--json-out", help="also append every JSON line to this file")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from assets_pipeline.models.load import resolve_device
    from assets_pipeline.parallel import image_threads, thread_map
    from assets_pipeline.stages.latents import _encode_pixels, _load_pixels, encode_text_entries

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        enc, scorer, resolution = load_models(args.shapes, device, Path(tmp) / "models")
        scorer.load()

        def clip_pixels(path):
            with Image.open(path) as img:
                return scorer.pixels(img.convert("RGB"))

        def vae_pixels(paths):  # as compute_latents: each photo decoded and cropped on the image threads
            return thread_map(lambda p: _load_pixels(p, False, (resolution, resolution), True), paths)

        photos = write_photos(Path(tmp), max(args.batch_sizes), resolution)
        for batch in args.batch_sizes:
            paths, captions = photos[:batch], [f"{CAPTION} {i}" for i in range(batch)]
            runs = {
                "vae_encode": lambda: _encode_pixels(vae_pixels(paths), enc),
                "text_encode": lambda: encode_text_entries(captions, enc),
                # as score_images: each photo decoded and preprocessed on the image threads, then one forward
                "clip_score": lambda: scorer.score_pixels(torch.stack(thread_map(clip_pixels, paths)), captions),
                # the host side alone (decode, crop or preprocess on the image threads): the ceiling it puts on
                # the two rows above; where they are close to it, a faster GPU would not make them faster
                "vae_host": lambda: vae_pixels(paths),
                "clip_host": lambda: thread_map(clip_pixels, paths),
            }
            for method, fn in runs.items():
                rate, peak = measure(fn, batch, args.iters, cuda)
                line = json.dumps({"method": method, "variant": "project", "shapes": args.shapes, "batch": batch,
                                   "images_per_s": round(rate, 2), "peak_mem_gib": round(peak, 2),
                                   "image_threads": image_threads(),
                                   "device": torch.cuda.get_device_name(device) if cuda else "cpu"})
                print(line, flush=True)
                if args.json_out:
                    with open(args.json_out, "a") as f:
                        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
