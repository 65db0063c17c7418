"""Training-step throughput: this project's step (cached latents + text embeddings) against a plain reference
step that VAE-encodes pixels and runs the text encoder every step. Same U-Net, batch and precision.

    python benchmarks/bench_training.py --shapes tiny --batch-sizes 4 16          # CPU, seconds
    python benchmarks/bench_training.py --shapes sd15 --batch-sizes 4 16          # GPU: SD 1.5 shapes

Each (variant, batch size) runs in its own process, so peak memory is that variant's alone: CUDA peak
allocated on a GPU, peak RSS on the CPU. Prints one JSON line per run, then a table with the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def build_models(shapes: str):
    """Random-weight models from config: the embedded tiny SD, or SD 1.5's shapes (U-Net 859.5 M params)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if shapes == "tiny":
        from assets_pipeline.base_model import EMBEDDED_RESOLUTION, build_embedded_pipeline

        p = build_embedded_pipeline()
        return p.unet, p.vae, p.text_encoder, DDPMScheduler.from_config(p.scheduler.config), EMBEDDED_RESOLUTION
    # SD 1.5: unet/config.json, vae/config.json and CLIP ViT-L/14's text tower.
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    return unet, vae, text, sched, 512


def run_one(variant: str, shapes: str, batch: int, steps: int, warmup: int, device: str, precision: str) -> dict:
    import resource

    import torch
    from accelerate import Accelerator

    from assets_pipeline.training.data import TrainingData
    from assets_pipeline.training.loop import compute_loss
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import Models

    torch.manual_seed(0)
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if precision == "auto":
        precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    acc = Accelerator(mixed_precision=precision, cpu=cpu)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    unet, vae, text, sched, res = build_models(shapes)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lat = (4, res // factor, res // factor)
    unet.to(acc.device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    unet, optimizer = acc.prepare(unet, optimizer)
    method = get_method("dreambooth")  # full U-Net training, the heaviest of the four
    cfg = method.config_cls(with_prior_preservation=False)
    n = 32
    if variant == "project":
        # What vae_latents hands the trainer: latent distributions and prompt embeddings, on the CPU.
        data = TrainingData(torch.randn(n, *lat), torch.rand(n, *lat) * 0.1, torch.randn(n, 77, text.config.hidden_size),
                            ["instance"] * n, ["a photo of sks dog"] * n)
        models = Models(unet=unet, noise_scheduler=sched, scaling_factor=vae.config.scaling_factor)
    else:
        vae.to(acc.device, dtype=dtype).eval()
        text.to(acc.device, dtype=dtype).eval()
        pixels = torch.rand(n, 3, res, res) * 2 - 1
        ids = torch.randint(0, text.config.vocab_size, (n, 77))

    def step(i: int):
        g = torch.Generator().manual_seed(i)
        with acc.autocast():
            if variant == "project":
                rows = data.batch(("instance",), batch_size=batch, sample_index=i * batch, seed=0,
                                  scaling_factor=models.scaling_factor, random_flip=False)
                loss = compute_loss(method, models, rows, cfg, g, acc.device, dtype)
            else:  # the plain loop: encode pixels and prompts every step
                idx = torch.randint(0, n, (batch,), generator=g)
                with torch.no_grad():
                    latents = vae.encode(pixels[idx].to(acc.device, dtype)).latent_dist.sample()
                    latents = latents * vae.config.scaling_factor
                    embeds = text(ids[idx].to(acc.device))[0]
                noise = torch.randn(latents.shape, generator=g).to(latents)
                t = torch.randint(0, 1000, (batch,), generator=g).to(acc.device)
                pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=embeds).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(warmup):
        step(i).item()
    if not cpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    loss.item()  # one sync at the end: the steps above queue asynchronously on a GPU
    if not cpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if not cpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "shapes": shapes, "batch": batch, "steps": steps, "precision": precision,
            "device": torch.cuda.get_device_name() if not cpu else "cpu",
            "unet_params_m": round(sum(p.numel() for p in acc.unwrap_model(unet).parameters()) / 1e6, 1),
            "images_per_s": round(batch * steps / elapsed, 2), "peak_mem_gib": round(peak / 2**30, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="'auto' = bf16 on a GPU that supports it, fp32 on CPU")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single variant in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.shapes, args.batch_sizes[0], args.steps, args.warmup,
                                 args.device, args.precision)))
        return 0
    rows = []
    for b in args.batch_sizes:
        for variant in ("reference", "project"):
            cmd = [sys.executable, __file__, "--one", variant, "--shapes", args.shapes, "--batch-sizes", str(b),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
                   "--precision", args.precision]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            print(out, flush=True)
            rows.append(json.loads(out))
    print(f"\n{'batch':>5} {'reference img/s':>16} {'project img/s':>14} {'ratio':>6} {'ref GiB':>8} {'proj GiB':>9}")
    for b in args.batch_sizes:
        ref, proj = (next(r for r in rows if r["batch"] == b and r["variant"] == v) for v in ("reference", "project"))
        print(f"{b:>5} {ref['images_per_s']:>16} {proj['images_per_s']:>14} "
              f"{proj['images_per_s'] / ref['images_per_s']:>6.2f} {ref['peak_mem_gib']:>8} {proj['peak_mem_gib']:>9}")
    print(f"device: {rows[0]['device']}, precision: {rows[0]['precision']}, U-Net {rows[0]['unet_params_m']} M params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
