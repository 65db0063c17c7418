"""Training-step throughput of the project's trainer against a plain diffusers-style loop, per method.

    python benchmarks/bench_training.py --shapes tiny                                   # CPU, ~1-2 minutes
    python benchmarks/bench_training.py --shapes sd15 --batch-sizes 4 16                # GPU: SD 1.5 shapes
    python benchmarks/bench_training.py --shapes sdxl --methods lora --batch-sizes 4   # GPU: SDXL at 1024 px
    python benchmarks/bench_training.py --shapes sd15 --methods lora --variants reference project-compiled
    python benchmarks/bench_training.py --shapes sd15 --methods lora --variants project-eager \
        --performance adapter_input_casts=on                                       # A/B one speed setting
    python benchmarks/bench_training.py --shapes flux --methods lora --batch-sizes 1 4 \
        --variants reference project-eager project-compiled                      # GPU: FLUX.1-dev at 1024 px
    python benchmarks/bench_training.py --shapes flux --methods lora --batch-sizes 1 --variants project-compiled \
        --config base_quantization=nf4 gradient_checkpointing=true                # LoRA over a 4-bit base
    python benchmarks/bench_training.py --shapes sd35 --methods dreambooth --batch-sizes 1 --variants project-eager \
        --config optimizer=adafactor gradient_checkpointing=true                  # DreamBooth's memory options
    python benchmarks/bench_training.py --pack 1 2 4 --steps 200                        # CPU: solo vs packed, ~5 min
    python benchmarks/bench_training.py --shapes sd15 --device cuda --pack 1 4 16 --steps 1000 \
        --solo-concepts 4                                                          # GPU: issue 26's measurement

``--shapes flux`` / ``sd35`` write the random-weight model folder once in bf16 (FLUX.1: 33 GB with T5, minutes);
the table adds the model TFLOP/s of the denoiser (forward FLOPs counted on the meta device, x2 for a frozen base,
x3 for a trained one), their share of the card's dense bf16 peak, and the denoiser's stored GiB (a quantized
base: its packed weights).

Variants (each run in its own process, so peak memory is that run's alone):
- ``reference``: the loop of diffusers' example scripts (train_dreambooth_lora.py, train_dreambooth.py,
  textual_inversion.py, train_controlnet.py): VAE-encodes pixels and runs the text encoder every step, reads
  the loss every step, plain AdamW. Pixels and token ids already sit on the GPU (kinder to it than the scripts'
  data loaders).
- ``plain-eager``, ``plain-compiled``: the same step written plainly on cached latents and embeddings (the VAE
  and, except for textual inversion, the text encoder run once before timing), fused AdamW on CUDA, no per-step
  loss read; ``plain-compiled`` adds channels_last and ``torch.compile`` of the whole trained network. What
  the project's loop would reach with no overhead of its own: the yardstick for its variants.
- ``project-eager``, ``project-compiled`` (regional compilation, cold compile cache),
  ``project-compiled-warm`` (the same, a fresh process whose local Inductor/Triton caches are empty, loading
  the kernels the cold run persisted), ``project-compiled-full`` and ``project-compiled-full-warm`` (the same
  pair with whole-network compilation; a warm variant is warm only after its cold one in the same invocation):
  the project's real trainer (``assets_pipeline.training.loop.train``) on a job over a synthetic latents bundle.

DreamBooth runs with prior preservation (batch b = b instance + b class rows). Both sides time ``--steps``
steps after one warm-up step (compilation, and cuDNN's trials where on, happen there; ``warmup_s`` is its time,
plus, for the project's compiled runs, reading the persisted kernels and writing what
was new: ``compile_cache_io_s``); ``images_per_s`` counts the rows the U-Net sees. Prints one JSON line per run,
then the ratio table.

``--pack N [N ...]`` (issue 26, many concepts on one GPU) measures something else: for each N, N LoRA concepts of
``--pack-photos`` (10) photos each, every one its own seed and random latents bundle, ``--steps`` steps (default 100;
the issue's measurement is 1,000) at batch 1, trained *solo* (today's trainer process per concept, ``python -m
assets_pipeline.training --job``, one after another) and *packed* (one process, the trainer a pack run launches:
``python -m assets_pipeline.training --pack JOB... --pack-size N``, training/pack_trainer.py). Both sides write each concept's output
as the trainer does (weights, lineage, validation renders scored by the embedded CLIP) and are timed as whole
processes: startup, imports, the base model's load, training, output. No checkpoints on either side (a pack
writes none). A packed run in which any concept failed fails the measurement. Prints one JSON line per side and N
(wall seconds, CPU-seconds of the child processes, the step loops' own seconds), then N | solo s/concept |
packed s/concept | speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a plain checkout works without installing the package
    sys.path.insert(0, str(ROOT))

METHODS = ("lora", "dreambooth", "textual_inversion", "controlnet")
PERFORMANCE = {
    "project-eager": {"compile": "none"},
    "project-compiled": {"compile": "regional"},
    "project-compiled-warm": {"compile": "regional"},
    "project-compiled-full": {"compile": "full"},
    "project-compiled-full-warm": {"compile": "full"},
}
PLAIN = ("plain-eager", "plain-compiled")
VARIANTS = ("reference", *PLAIN, *PERFORMANCE)
ROWS = 16  # distinct instance (and class) rows in the synthetic bundle


SHAPES = ("tiny", "tiny-sdxl", "sd15", "sdxl", "tiny-sd3", "tiny-flux", "sd35", "flux")
SDXL_SHAPES = ("tiny-sdxl", "sdxl")
SDXL_REFERENCE_METHODS = ("lora", "dreambooth")  # the reference and plain loops' SDXL conditioning is built for these
# The flow-matching transformers (SD 3.5 large, FLUX.1-dev; tiny-*: the embedded test models): the reference loop
# is diffusers' train_dreambooth_lora_sd3.py / _flux.py (and their DreamBooth twins); no plain loops.
FLOW_SHAPES = ("tiny-sd3", "tiny-flux", "sd35", "flux")
# Dense bf16 tensor-core peaks (NVIDIA's data sheets, without sparsity), matched against the device's name in order.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0),
                    ("L40S", 362.1), ("A10G", 70.0))


def model_folder(shapes: str, work: Path, device: str) -> tuple[Path, int]:
    """The random-weight model folder of ``shapes`` (made once under ``work``) and its training resolution:
    ``tiny`` / ``tiny-sdxl`` are the embedded test models, ``sd15`` / ``sdxl`` the real sizes (models/embedded.py)."""
    from assets_pipeline.models.embedded import RESOLUTION, write_model_folder

    dtype = "bfloat16" if shapes in ("sd35", "flux") else "float32"  # FLUX.1 is 48 GB in float32
    return write_model_folder(shapes, work / f"model-{shapes}", device=device, dtype=dtype), RESOLUTION[shapes]


def synthetic_job(method: str, shapes: str, batch: int, steps: int, variant: str, work: Path, device: str,
                  performance: dict | None = None, config: dict | None = None):
    """A trainer job over a random latents bundle for the model folder of ``shapes`` (both made once)."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from assets_pipeline.models.embedded import SPECS
    from assets_pipeline.models.families import get_family
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.models.unet import sdxl_add_time_ids
    from assets_pipeline.store import record_digest
    from assets_pipeline.training.job import TrainingRow, TrainJob
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.runtime.settings import Performance

    folder, res = model_folder(shapes, work, device)
    ref = resolve_base_model(str(folder), work / "artifacts", res, None, None)
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    side = res // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    rows, bundle = [], work / f"latents-{shapes}"
    for role in ("instance", "class"):
        for i in range(ROWS):
            control = bundle / f"control-{i}.png"
            rows.append(TrainingRow(image_sha256=f"{role}-{i}", role=role, caption=f"a photo of sks dog {i}",
                                    latent_key=None, text_key=None, source_path=f"synthetic/{role}-{i}",
                                    decoded_path=str(control),
                                    control_path=str(control) if role == "instance" else None))
    if not (bundle / "latents.safetensors").is_file():
        bundle.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        n = len(rows)
        square = f"{res}x{res}"  # every row in the square bucket (stages/latents.py's bundle layout)
        channels = vae_cfg.get("latent_channels", 4)
        embeds, pooled = text_shapes(shapes)  # one caption's, as the family's encoders give them
        tensors = {f"latent_mean@{square}": torch.randn(n, channels, side, side, generator=g),
                   f"latent_std@{square}": torch.rand(n, channels, side, side, generator=g) * 0.1,
                   "prompt_embeds": torch.randn(n, *embeds, generator=g)}
        if pooled is not None:  # SDXL, SD 3.x, Flux: the pooled embedding
            tensors["pooled_prompt_embeds"] = torch.randn(n, *pooled, generator=g)
        family = get_family(SPECS[shapes].family)
        if family.micro_conditioning:  # SDXL: the micro-conditioning of an uncropped square photo
            tensors["add_time_ids"] = sdxl_add_time_ids((res, res), (0, 0), (res, res)).repeat(n, 1)
        meta = {"text_max_lengths": json.dumps(list(family.text_max_lengths()))} if family.has_sequence_length else {}
        save_file(tensors, str(bundle / "latents.safetensors"),
                  metadata={"image_sha256": json.dumps([r.image_sha256 for r in rows]),
                            "role": json.dumps([r.role for r in rows]), "bucket": json.dumps([square] * n), **meta})
        record_digest(bundle / "latents.safetensors")  # trainers refuse a bundle without its digest
        for i in range(ROWS):
            Image.effect_noise((res, res), 64).convert("RGB").save(bundle / f"control-{i}.png")
    m = get_method(method)
    cfg = m.config_cls(**{**m.default_config(ROWS, quick=False), "max_train_steps": steps + 1,
                          "train_batch_size": batch, "checkpointing_steps": 10**9, **(config or {})})
    run = work / "runs" / f"{method}-{variant}-{batch}-{os.getpid()}"
    return TrainJob(concept="bench", method=method, config=cfg, base_model=ref, latents_dir=str(bundle),
                    output_dir=str(run / "out"), checkpoint_dir=str(run / "ckpt"), token="sks", class_noun="dog",
                    training_images=tuple(rows if method == "dreambooth" else rows[:ROWS]), lineage={}, device=device,
                    performance=Performance.from_dict({**PERFORMANCE[variant], "micro_batch": "configured",
                                                       **(performance or {})}),
                    cache_dir=str(work / f"cache-{method}-{batch}"))


def meta_pipeline(shapes: str):
    """The pipeline of ``shapes`` on PyTorch's meta device: its shapes, nothing allocated."""
    from assets_pipeline.models.embedded import build_pipeline

    return build_pipeline(shapes, "meta")


def text_shapes(shapes: str, pipe=None) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """One caption's prompt embedding shape and pooled embedding shape (None without one), as the family's text
    encoding gives them at its default T5 length (a meta-device forward: no weights)."""
    import torch

    from assets_pipeline.models.embedded import SPECS
    from assets_pipeline.models.families import get_family
    from assets_pipeline.models.text import tokenize

    pipe = pipe or meta_pipeline(shapes)
    family = get_family(SPECS[shapes].family)
    ids = tokenize([getattr(pipe, e.tokenizer) for e in family.text_encoders], ["a photo of sks dog"],
                   family.text_max_lengths())
    with torch.device("meta"):
        embeds, pooled = family.encode_prompt([getattr(pipe, e.component) for e in family.text_encoders],
                                              [i.to("meta") for i in ids])
    return tuple(embeds.shape[1:]), (tuple(pooled.shape[1:]) if pooled is not None else None)


def denoiser_flops_per_image(shapes: str, method: str) -> float | None:
    """Model FLOPs of one training image through the denoiser: its forward counted by ``FlopCounterMode`` on the
    meta device at the training resolution, times 2 where the base is frozen (LoRA: the backward computes the
    activations' gradients) or 3 where it trains (DreamBooth: the weights' gradients too). None for the methods
    whose trained network is not the denoiser (textual inversion, ControlNet)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from assets_pipeline.models.embedded import RESOLUTION, SPECS
    from assets_pipeline.models.families import get_family

    if method not in ("lora", "dreambooth"):
        return None
    pipe = meta_pipeline(shapes)
    family = get_family(SPECS[shapes].family)
    embeds, pooled = text_shapes(shapes, pipe)
    side = RESOLUTION[shapes] // pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    denoiser = getattr(pipe, family.denoiser.component)
    with torch.device("meta"):
        batch = type("Batch", (), {"pooled_embeds": torch.zeros(1, *pooled) if pooled else None,
                                   "time_ids": torch.zeros(1, 6)})()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            family.denoiser.predict(denoiser, torch.zeros(1, channels, side, side), torch.tensor([500.0]),
                                    torch.zeros(1, *embeds), batch)
    return counter.get_total_flops() * (3 if method == "dreambooth" else 2)


def bf16_peak_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in BF16_PEAK_TFLOPS if name in device_name), None)


def run_project(method, shapes, batch, steps, variant, work: Path, device: str, performance: dict | None = None,
                profile_out: str | None = None, config: dict | None = None) -> dict:
    from assets_pipeline.training.checkpoints import checkpoint_root
    from assets_pipeline.training.loop import train
    from assets_pipeline.training.runtime import PROFILE_DIR

    job = synthetic_job(method, shapes, batch, steps, variant, work, device, performance, config)
    state = train(job, progress=lambda msg: None)
    s = state.stats
    out = {"images_per_s": s["images_per_s"], "warmup_s": s["warmup_s"], "peak_mem_gib": s["peak_mem_gib"],
           "denoiser_gib": s.get("denoiser_gib"),
           "compile_cache": s["compile_cache"], "compile_cache_io_s": s["compile_cache_io_s"],
           "channels_last": s["channels_last"], "cudnn_benchmark": s["cudnn_benchmark"],
           "attention": s["attention"], "precision": s["precision"], "device": s["device"]}
    if s.get("compile_stats"):  # Dynamo vs backend seconds, graphs, FX-graph/AOTAutograd cache hits and misses
        out["compile_stats"] = s["compile_stats"]
    if s.get("profile"):  # performance profile_steps=N: the trace leaves the run's folder before it is removed
        out["profile"] = s["profile"]
        if profile_out:
            dest = Path(profile_out) / f"{method}-{variant}-{batch}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(checkpoint_root(job) / PROFILE_DIR, dest)
            out["profile"]["folder"] = str(dest)
    return out


def time_steps(step, rows: int, steps: int, cuda: bool, dtype) -> dict:
    """One warm-up ``step()``, then ``steps`` timed ones: images/s (``rows`` a step), the warm-up's seconds, the
    peak CUDA memory, the precision and the device."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"images_per_s": round(rows * steps / elapsed, 2), "warmup_s": round(warmup, 2),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "precision": str(dtype).removeprefix("torch."), "device": torch.cuda.get_device_name() if cuda else "cpu"}


def run_reference(method, shapes, batch, steps, work: Path, device: str, variant: str = "reference") -> dict:
    """The example scripts' step: encode pixels and prompt, noise, predict, MSE, backward, clip, AdamW. The
    ``plain-*`` variants: the same step on latents and embeddings encoded once, no loss read per step.

    SDXL (lora, dreambooth): as train_dreambooth_lora_sdxl.py without a trained text encoder, the prompt is
    encoded once by both encoders (hidden states and pooled embedding) and the VAE, in fp32 (its
    ``force_upcast``), encodes every step; the U-Net gets the pooled embedding and the time ids."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from assets_pipeline.models.families import get_family
    from assets_pipeline.models.text import tokenize
    from assets_pipeline.models.unet import sdxl_add_time_ids

    cuda, sdxl = device == "cuda", shapes in SDXL_SHAPES
    if sdxl and method not in SDXL_REFERENCE_METHODS:
        raise ValueError(f"the {variant} loop for SDXL shapes is built for {SDXL_REFERENCE_METHODS}, not {method}")
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    folder, res = model_folder(shapes, work, device)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    vae_dtype = torch.float32 if sdxl and vae.config.force_upcast else dtype
    vae.to(device, vae_dtype)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2") if sdxl else None
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    vae.requires_grad_(False)
    text.requires_grad_(False)
    unet.requires_grad_(method == "dreambooth")
    controlnet = None
    if method == "lora":
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    elif method == "controlnet":
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        controlnet = get_family("sd1").denoiser.controlnet_from(unet, factor).to(device).train()
    elif method == "textual_inversion":
        text.get_input_embeddings().requires_grad_(True)
    unet.to(device, torch.float32 if method == "dreambooth" else dtype)
    text.to(device, torch.float32 if method == "textual_inversion" else dtype)
    trained = {"lora": unet, "dreambooth": unet, "textual_inversion": text, "controlnet": controlnet}[method]
    cast_training_params(trained, dtype=torch.float32)
    params = [p for p in trained.parameters() if p.requires_grad]
    plain = variant in PLAIN
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=plain and cuda)
    original = text.get_input_embeddings().weight.detach().clone()
    rows = 2 * batch if method == "dreambooth" else batch  # instance + class rows with prior preservation
    g = torch.Generator(device).manual_seed(0)
    pixels = torch.rand(rows, 3, res, res, device=device, generator=g) * 2 - 1
    ids = tok(["a photo of sks dog"] * rows, padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    cached_latents = cached_embeds = None
    added = {}  # SDXL's added_cond_kwargs
    if sdxl:  # the prompt encoded once (the SDXL script without a trained text encoder), by both encoders
        text_2.requires_grad_(False).to(device, dtype)
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
        with torch.no_grad():
            cached_embeds, pooled = get_family("sdxl").encode_prompt(
                [text, text_2], [t.to(device) for t in tokenize([tok, tokenizer_2], ["a photo of sks dog"] * rows)])
        time_ids = sdxl_add_time_ids((res, res), (0, 0), (res, res)).repeat(rows, 1).to(device, dtype)
        added = {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids}}
        cached_embeds = cached_embeds.to(dtype)
    if plain:  # encoded once, as the project's latents bundle holds them
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32 and not sdxl):
            cached_latents = vae.encode(pixels.to(vae_dtype)).latent_dist.sample() * vae.config.scaling_factor
            if method != "textual_inversion" and cached_embeds is None:
                cached_embeds = text(ids)[0]
    if variant == "plain-compiled":  # what runs forward and backward every step, whole
        for net in (unet, controlnet, text if method == "textual_inversion" else None):
            if net is not None and cuda and net is not text:
                net.to(memory_format=torch.channels_last)
            if net is not None:
                net.compile(dynamic=False)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            if cached_latents is not None:
                latents = cached_latents
            else:  # SDXL's VAE in fp32, outside autocast, as the SDXL scripts run it
                low = dtype != torch.float32 and not sdxl
                with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=low):
                    latents = vae.encode(pixels.to(vae_dtype)).latent_dist.sample() * vae.config.scaling_factor
            if cached_embeds is not None:
                embeds = cached_embeds
            else:
                with torch.set_grad_enabled(method == "textual_inversion"):
                    embeds = text(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (rows,), device=device)
            noisy = sched.add_noise(latents, noise, t)
            kw = {}
            if controlnet is not None:
                down, mid = controlnet(noisy, t, encoder_hidden_states=embeds, controlnet_cond=pixels * 0.5 + 0.5,
                                       return_dict=False)
                kw = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            pred = unet(noisy, t, encoder_hidden_states=embeds, **kw, **added).sample
            if method == "dreambooth":
                pred, pred_prior = pred.chunk(2)
                noise, noise_prior = noise.chunk(2)
                loss = F.mse_loss(pred.float(), noise.float()) + F.mse_loss(pred_prior.float(), noise_prior.float())
            else:
                loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if method == "textual_inversion":  # the script restores every other row after each step
            keep = torch.ones(original.shape[0], dtype=torch.bool, device=device)
            keep[-1] = False
            with torch.no_grad():
                text.get_input_embeddings().weight[keep] = original[keep]
        if plain:
            return loss.detach()
        return loss.detach().item()  # the scripts log the loss every step (a host sync)

    return time_steps(step, rows, steps, cuda, dtype)


def run_reference_flow(method, shapes, batch, steps, work: Path, device: str) -> dict:
    """The loop of diffusers' train_dreambooth_lora_flux.py / train_dreambooth_lora_sd3.py (LoRA) and
    train_dreambooth_flux.py / train_dreambooth_sd3.py (DreamBooth, prior preservation: 2 x batch rows), each step
    as they run it with per-image captions (``custom_instance_prompts``): the VAE encodes the pixels
    (``(latent - shift_factor) x scaling_factor``), every text encoder (CLIP and T5, at the family's T5 length)
    encodes the captions, timesteps from ``compute_density_for_timestep_sampling`` (the script's default
    weighting: Flux ``none``, SD 3 ``logit_normal``), ``(1 - sigma) x latents + sigma x noise``, the transformer's
    prediction (Flux: packed latents, position ids, guidance 3.5), ``compute_loss_weighting_for_sd3``, MSE against
    ``noise - latents`` (SD 3: ``--precondition_outputs``, against the latents), backward, clip, AdamW, the loss
    read. Weights in bf16 on CUDA (the scripts' ``--mixed_precision bf16``), LoRA's parameters in fp32 (their
    ``cast_training_params``); DreamBooth trains the transformer in fp32 under autocast as those scripts do."""
    import torch
    from diffusers.training_utils import (cast_training_params, compute_density_for_timestep_sampling,
                                          compute_loss_weighting_for_sd3)
    from peft import LoraConfig

    from assets_pipeline.models.embedded import SPECS
    from assets_pipeline.models.families import diffusers_class, get_family
    from assets_pipeline.models.text import tokenize

    if method not in SDXL_REFERENCE_METHODS:
        raise ValueError(f"the reference loop for {shapes} is built for {SDXL_REFERENCE_METHODS}, not {method}")
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    family = get_family(SPECS[shapes].family)
    flux = family.name == "flux"
    folder, res = model_folder(shapes, work, device)
    pipe = diffusers_class(family.pipeline_class).from_pretrained(folder, torch_dtype=dtype)
    transformer, vae, scheduler = pipe.transformer, pipe.vae, pipe.scheduler
    encoders = [getattr(pipe, e.component) for e in family.text_encoders]
    tokenizers = [getattr(pipe, e.tokenizer) for e in family.text_encoders]
    for module in (vae, *encoders):
        module.requires_grad_(False).to(device, dtype)
    if method == "lora":
        transformer.requires_grad_(False).to(device, dtype)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                           target_modules=list(family.denoiser.lora_targets)))
        cast_training_params(transformer, dtype=torch.float32)
    else:
        transformer.requires_grad_(True).to(device, torch.float32)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    weighting = "none" if flux else "logit_normal"
    rows = 2 * batch if method == "dreambooth" else batch
    g = torch.Generator(device).manual_seed(0)
    pixels = torch.rand(rows, 3, res, res, device=device, generator=g, dtype=dtype) * 2 - 1
    captions = [f"a photo of sks dog {i}" for i in range(rows)]
    shift = vae.config.shift_factor or 0.0

    def step():
        with torch.no_grad():
            latents = (vae.encode(pixels).latent_dist.sample() - shift) * vae.config.scaling_factor
            ids = [t.to(device) for t in tokenize(tokenizers, captions, family.text_max_lengths())]
            embeds, pooled = family.encode_prompt(encoders, ids)
        latents = latents.to(dtype)
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(weighting, rows, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices].to(device)
        sigmas = scheduler.sigmas.to(device, latents.dtype)[indices].reshape(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        batch_ = type("Batch", (), {"pooled_embeds": pooled})()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            pred = family.denoiser.predict(transformer, noisy, timesteps, embeds.to(dtype), batch_)
        if flux:
            target = noise - latents
        else:  # --precondition_outputs
            pred, target = pred * (-sigmas) + noisy, latents
        weights = compute_loss_weighting_for_sd3(weighting, sigmas)
        per_row = (weights.float() * (pred.float() - target.float()) ** 2).reshape(rows, -1).mean(1)
        if method == "dreambooth":  # instance half + prior half (prior_loss_weight 1)
            loss = per_row[:batch].mean() + per_row[batch:].mean()
        else:
            loss = per_row.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    return time_steps(step, rows, steps, cuda, dtype)


def run_one(args) -> dict:
    import resource

    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    method, variant, batch = args.one.split(",")
    batch = int(batch)
    work = Path(args.workdir)
    if variant == "reference" and args.shapes in FLOW_SHAPES:
        out = run_reference_flow(method, args.shapes, batch, args.steps, work, device)
    elif variant == "reference" or variant in PLAIN:
        out = run_reference(method, args.shapes, batch, args.steps, work, device, variant)
    else:
        out = run_project(method, args.shapes, batch, args.steps, variant, work, device,
                          parse_settings(args.performance), args.profile_out, parse_pairs(args.config))
        changed = [*(args.performance or []), *(args.config or [])]
        if changed:  # the row says which settings it changed: "project-eager[adapter_input_casts=on]"
            variant = f"{variant}[{','.join(changed)}]"
    if out["peak_mem_gib"] is None:  # CPU: the process's peak RSS (torch and the libraries included)
        out["peak_mem_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return {"method": method, "variant": variant, "batch": batch, "shapes": args.shapes, "steps": args.steps, **out}


def parse_pairs(pairs: list[str] | None, option: str = "--config") -> dict:
    """``KEY=VALUE`` pairs; values are JSON where they parse (true, 4, 1e-4), else strings."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{option} {pair!r}: expected KEY=VALUE, e.g. adapter_input_casts=on")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_settings(pairs: list[str] | None) -> dict:
    """``KEY=VALUE`` performance settings (training/runtime/settings.py)."""
    from assets_pipeline.training.runtime.settings import Performance

    out = parse_pairs(pairs, "--performance")
    Performance.from_dict(out)  # an unknown key or a bad value fails here, before any run
    return out


def check_method_config(methods, pairs: list[str] | None) -> None:
    """Each method's config takes the ``--config`` settings (an unknown key or a bad value fails before any run)."""
    from assets_pipeline.training.methods import get_method

    config = parse_pairs(pairs)
    for method in methods:
        m = get_method(method)
        try:
            m.config_cls(**{**m.default_config(ROWS, quick=False), **config})
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--config for {method}: {e}") from e


def table(rows: list[dict]) -> str:
    """The runs side by side: img/s, the ratio to the reference loop, peak memory, warm-up, and where the
    denoiser's FLOPs per image are known, the model TFLOP/s reached and their share of the card's bf16 peak."""
    lines = [f"{'method':<18} {'batch':>5} {'variant':<22} {'img/s':>8} {'x ref':>6} {'peak GiB':>9} {'warmup s':>9}"
             f" {'TFLOP/s':>8} {'% peak':>7} {'denoiser GiB':>12}"]
    several = len({r.get("shapes") for r in rows}) > 1  # runs of several model sizes: the method says which
    for r in rows:
        ref = next((x for x in rows if x["method"] == r["method"] and x["batch"] == r["batch"]
                    and x.get("shapes") == r.get("shapes") and x["variant"] == "reference"), None)
        ratio = f"{r['images_per_s'] / ref['images_per_s']:.2f}" if ref and r["images_per_s"] else "-"
        method = f"{r['method']} ({r.get('shapes')})" if several else r["method"]
        tflops = share = "-"
        if r.get("flops_per_image") and r["images_per_s"]:
            achieved = r["flops_per_image"] * r["images_per_s"] / 1e12
            tflops = f"{achieved:.3g}"
            if peak := bf16_peak_tflops(r.get("device", "")):
                share = f"{100 * achieved / peak:.1f}"
        lines.append(f"{method:<18} {r['batch']:>5} {r['variant']:<22} {r['images_per_s'] or '-':>8} {ratio:>6} "
                     f"{r['peak_mem_gib']:>9} {r['warmup_s']:>9} {tflops:>8} {share:>7} {r.get('denoiser_gib') or '-':>12}")
    return "\n".join(lines)


# -- --pack N: solo trainer processes one after another vs one packed process (issue 26) --------------------------

PACK_DEFAULT_STEPS = 100  # CPU default; the issue's measurement is 1,000 steps (--steps 1000 on a GPU)


def pack_jobs(n: int, shapes: str, photos: int, steps: int, work: Path, device: str, mode: str) -> list:
    """``n`` LoRA concepts of ``photos`` instance rows each, every one its own seed and its own random latents
    bundle at ``shapes`` (made once under ``work/pack-data``), batch 1, ``steps`` steps, no checkpoints (a pack
    writes none), validation of the output as the trainer does it (the embedded CLIP scores it: no downloads).
    Each job's output and checkpoint folders are fresh, under ``work/pack-runs/<mode>-<n>``."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from assets_pipeline.models.embedded import SPECS
    from assets_pipeline.models.families import get_family
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.models.unet import sdxl_add_time_ids
    from assets_pipeline.stages.scoring import ensure_embedded_clip
    from assets_pipeline.store import record_digest
    from assets_pipeline.training.job import TrainingRow, TrainJob
    from assets_pipeline.training.methods import get_method

    folder, res = model_folder(shapes, work, device)
    artifacts = work / "artifacts"
    ref = resolve_base_model(str(folder), artifacts, res, None, None)
    ensure_embedded_clip(artifacts / "base_models")
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    side = res // 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    family = get_family(SPECS[shapes].family)
    square = f"{res}x{res}"
    m = get_method("lora")
    runs = work / "pack-runs" / f"{mode}-{n}"
    shutil.rmtree(runs, ignore_errors=True)
    jobs = []
    for i in range(n):
        concept = f"concept{i:02d}"
        bundle = work / "pack-data" / f"{shapes}-{photos}" / concept
        rows = [TrainingRow(image_sha256=f"{concept}-{j}", role="instance", caption=f"a photo of sks dog {j}",
                            latent_key=None, text_key=None, source_path=f"synthetic/{concept}/{j}.png",
                            decoded_path=str(bundle / f"{j}.png")) for j in range(photos)]
        if not (bundle / "latents.safetensors").is_file():
            bundle.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(1000 + i)  # each concept its own photos
            embeds, pooled = text_shapes(shapes)
            tensors = {f"latent_mean@{square}": torch.randn(photos, vae_cfg.get("latent_channels", 4), side, side,
                                                            generator=g),
                       f"latent_std@{square}": torch.rand(photos, vae_cfg.get("latent_channels", 4), side, side,
                                                          generator=g) * 0.1,
                       "prompt_embeds": torch.randn(photos, *embeds, generator=g)}
            if pooled is not None:
                tensors["pooled_prompt_embeds"] = torch.randn(photos, *pooled, generator=g)
            if family.micro_conditioning:
                tensors["add_time_ids"] = sdxl_add_time_ids((res, res), (0, 0), (res, res)).repeat(photos, 1)
            meta = ({"text_max_lengths": json.dumps(list(family.text_max_lengths()))}
                    if family.has_sequence_length else {})
            for j in range(photos):  # the decoded photos validation's CLIP-I compares with
                Image.effect_noise((res, res), 64 + i).convert("RGB").save(bundle / f"{j}.png")
            save_file(tensors, str(bundle / "latents.safetensors"),
                      metadata={"image_sha256": json.dumps([r.image_sha256 for r in rows]),
                                "role": json.dumps(["instance"] * photos), "bucket": json.dumps([square] * photos),
                                **meta})
            record_digest(bundle / "latents.safetensors")
        cfg = m.config_cls(**{**m.default_config(photos, quick=False), "max_train_steps": steps,
                              "train_batch_size": 1, "gradient_accumulation_steps": 1, "seed": i + 1,
                              "checkpointing_steps": 10**9})
        jobs.append(TrainJob(concept=concept, method="lora", config=cfg, base_model=ref, latents_dir=str(bundle),
                             output_dir=str(runs / concept / "out"), checkpoint_dir=str(runs / concept / "ckpt"),
                             token="sks", class_noun="dog", training_images=tuple(rows), lineage={}, device=device,
                             scorer={"model_name": "embedded", "artifact_root": str(artifacts)}))
    return jobs


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``; its wall seconds (startup, imports, model load, training, output) and CPU seconds (user + sys of
    the waited-for child, from RUSAGE_CHILDREN)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT,
                              check=False)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(cmd, -1, "", f"timed out after {timeout} s")
    return proc, time.perf_counter() - t0, _children_cpu_s() - cpu0


def run_pack_bench(args, device: str) -> list[dict]:
    """For each N of ``--pack``: N concepts trained solo (``python -m assets_pipeline.training --job``, one process
    each, one after another) and packed (one ``--pack`` trainer process), wall and CPU seconds per concept."""
    import torch

    from assets_pipeline.training.pack import packable

    work = Path(args.workdir)
    rows = []
    for n in args.pack:
        for mode in ("solo", "packed"):
            jobs = pack_jobs(n, args.shapes, args.pack_photos, args.steps, work, device, mode)
            groups, refused = packable(jobs)
            if refused or len(groups) != 1:
                raise SystemExit(f"the {n} benchmark jobs do not form one pack: {[str(r) for r in refused]}")
            jobs_dir = work / "pack-runs" / f"{mode}-{n}"
            jobs_dir.mkdir(parents=True, exist_ok=True)
            for i, job in enumerate(jobs):
                job.save(jobs_dir / f"job-{i:03d}.json")
            total = cpu = 0.0
            trained: list[float] = []
            # Solo's cost per concept does not depend on N: --solo-concepts K times the first K of them alone.
            measured = min(n, args.solo_concepts or n) if mode == "solo" else n
            files = [str(jobs_dir / f"job-{i:03d}.json") for i in range(len(jobs))]
            # packed: the trainer a pack run launches (assets/packs.py), all N in one pack
            cmds = ([[sys.executable, "-m", "assets_pipeline.training", "--job", f] for f in files[:measured]]
                    if mode == "solo" else
                    [[sys.executable, "-m", "assets_pipeline.training", "--pack", *files, "--pack-size", str(n)]])
            error = None
            for cmd in cmds:
                proc, wall, cpu_s = _timed(cmd, args.run_timeout)
                total, cpu = total + wall, cpu + cpu_s
                if proc.returncode:  # a packed trainer exits 1 when any concept failed: the measurement is void
                    error = proc.stderr[-2000:]
                    break
            if error is None:
                for job in jobs[:measured]:  # every concept wrote its output, all its steps, solo or packed
                    metrics = Path(job.output_dir) / "metrics.json"
                    if not metrics.is_file():
                        error = f"{job.concept}: no output ({metrics} missing)"
                        break
                    record = json.loads(metrics.read_text())
                    lineage = json.loads((Path(job.output_dir) / "lineage.json").read_text())
                    if record["steps"] != args.steps or (mode == "packed" and n > 1 and
                                                         (lineage.get("pack") or {}).get("size") != n):
                        error = f"{job.concept}: {record['steps']} steps, pack {lineage.get('pack')}: not as planned"
                        break
                    trained.append(record["training_speed"].get("train_s") or 0.0)
                if mode == "packed" and trained:  # the pack's step loop, to its last concept's last step
                    trained = [max(trained)]
            row = {"pack": n, "mode": mode, "steps": args.steps, "photos": args.pack_photos, "batch": 1,
                   "shapes": args.shapes, "device": device,
                   "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "torch": torch.__version__, "concepts_run": measured, "total_s": round(total, 2),
                   "per_concept_s": round(total / measured, 2), "cpu_s": round(cpu, 2),
                   "per_concept_cpu_s": round(cpu / measured, 2), "train_s": round(sum(trained), 2),
                   "per_concept_train_s": round(sum(trained) / measured, 2)}
            if error is not None:
                row["error"] = error
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.json_out:
                with open(args.json_out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            shutil.rmtree(jobs_dir, ignore_errors=True)
    return rows


def pack_table(rows: list[dict]) -> str:
    """N | solo s/concept | packed s/concept | speed-up, and the same for CPU seconds and the step loops' seconds
    alone (solo: each trainer's ``train_s``, loop.train's timer from its first step to its last; packed: the pack's
    step loop, to its last concept's last step)."""
    lines = [(f"{'N':>3} {'solo s/concept':>15} {'packed s/concept':>17} {'speed-up':>9} {'solo CPU-s/c':>13} "
              f"{'packed CPU-s/c':>15} {'solo train s/c':>15} {'packed train s/c':>17}")]
    for n in dict.fromkeys(r["pack"] for r in rows):
        solo = next((r for r in rows if r["pack"] == n and r["mode"] == "solo" and "error" not in r), None)
        packed = next((r for r in rows if r["pack"] == n and r["mode"] == "packed" and "error" not in r), None)

        def cell(r, key):
            return f"{r[key]:.2f}" if r else "failed"

        speed = f"{solo['per_concept_s'] / packed['per_concept_s']:.2f}x" if solo and packed else "-"
        lines.append(f"{n:>3} {cell(solo, 'per_concept_s'):>15} {cell(packed, 'per_concept_s'):>17} {speed:>9} "
                     f"{cell(solo, 'per_concept_cpu_s'):>13} {cell(packed, 'per_concept_cpu_s'):>15} "
                     f"{cell(solo, 'per_concept_train_s'):>15} {cell(packed, 'per_concept_train_s'):>17}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=SHAPES, default="tiny",
                    help="tiny / tiny-sdxl / tiny-sd3 / tiny-flux: the embedded test models (CPU); sd15 / sdxl / "
                         "sd35 / flux: SD 1.5 / SDXL base 1.0 / SD 3.5 large / FLUX.1-dev sizes at 512 / 1024 px "
                         "(GPU; random weights, the model folder written once in bf16)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS,
                    default=["reference", "project-eager", "project-compiled", "project-compiled-warm"])
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps after one warm-up step (default 10); with --pack: each concept's training "
                         f"steps (default {PACK_DEFAULT_STEPS}; the issue's measurement is 1000)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "assets_pipeline_bench_training"),
                    help="model folders and latents are made here once and reused")
    ap.add_argument("--run-timeout", type=float, default=1800, help="seconds one run may take")
    ap.add_argument("--performance", nargs="+", metavar="KEY=VALUE",
                    help="performance settings for the project's variants on top of theirs (training/runtime/settings.py), "
                         "e.g. adapter_input_casts=on; the rows' variant names show them")
    ap.add_argument("--config", nargs="+", metavar="KEY=VALUE",
                    help="method config for the project's variants (what a concept.toml section sets), e.g. "
                         "base_quantization=nf4 gradient_checkpointing=true optimizer=adafactor; the rows' variant "
                         "names show them")
    ap.add_argument("--profile-out", help="with --performance profile_steps=N: copy each project run's profile "
                                          "(trace.json.gz, ops.txt, summary.json) to DIR/<method>-<variant>-<batch>")
    ap.add_argument("--json-out", help="also write every run's JSON line to this file")
    ap.add_argument("--table-from", metavar="JSONL",
                    help="print the ratio table of the runs recorded in this --json-out file (several invocations) "
                         "and exit")
    ap.add_argument("--pack", type=int, nargs="+", metavar="N",
                    help="instead of the step-throughput runs: for each N, N LoRA concepts of --pack-photos photos "
                         "at batch 1 trained solo (one trainer process each, one after another: python -m "
                         "assets_pipeline.training --job) and packed (one process, training/pack.py's train_pack), "
                         "each writing its output; seconds and CPU-seconds per concept, and the speed-up")
    ap.add_argument("--pack-photos", type=int, default=10, help="photos (rows) per concept with --pack")
    ap.add_argument("--solo-concepts", type=int, metavar="K",
                    help="with --pack: time the solo side on the first K of each N's concepts only (its cost per "
                         "concept does not depend on N; rows say concepts_run), to fit a device lease")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "method,variant,batch" in this process
    args = ap.parse_args()
    if args.steps is None:
        args.steps = PACK_DEFAULT_STEPS if args.pack else 10
    if args.pack:
        import torch

        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
        device = "cpu" if device == "auto" else device
        print(f"--pack {' '.join(map(str, args.pack))}: {args.pack_photos} photos per concept, batch 1, "
              f"{args.steps} steps each, --shapes {args.shapes}, device {device}", flush=True)
        rows = run_pack_bench(args, device)
        print()
        print(pack_table(rows))
        return 0 if rows and not any("error" in r for r in rows) else 1
    loops = [v for v in args.variants if v == "reference" or v in PLAIN]
    other = [m for m in args.methods if m not in SDXL_REFERENCE_METHODS]
    plain = [v for v in args.variants if v in PLAIN]
    if args.shapes in FLOW_SHAPES and plain and not args.table_from:
        ap.error(f"--shapes {args.shapes}: the {'/'.join(plain)} loops are built for the U-Net families; compare "
                 "the flow-matching transformers' project variants with the reference loop")
    if args.shapes in (*SDXL_SHAPES, *FLOW_SHAPES) and loops and other and not (args.one or args.table_from):
        ap.error(f"--shapes {args.shapes}: the {'/'.join(loops)} loops are built for "
                 f"{', '.join(SDXL_REFERENCE_METHODS)} only, not {', '.join(other)}; run those methods with the "
                 "project's variants alone")
    if args.table_from:
        rows = [json.loads(line) for line in Path(args.table_from).read_text().splitlines() if line.strip()]
        print(pack_table(rows) if rows and "mode" in rows[0] else table(rows))  # a --pack file, or step runs
        return 0
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return 0
    parse_settings(args.performance)
    check_method_config(args.methods, args.config)
    work = Path(args.workdir)
    rows = []
    for method in args.methods:
        flops = denoiser_flops_per_image(args.shapes, method)  # once per method, not in every run's process
        for b in args.batch_sizes:
            shutil.rmtree(work / f"cache-{method}-{b}", ignore_errors=True)  # the cold run starts cold
            for variant in args.variants:
                # Fresh local compiler caches per process: only the persisted artifact may make a run warm.
                local = tempfile.mkdtemp(prefix="inductor-")
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{local}/inductor", "TRITON_CACHE_DIR": f"{local}/triton"}
                cmd = [sys.executable, __file__, "--one", f"{method},{variant},{b}", "--shapes", args.shapes,
                       "--steps", str(args.steps), "--device", args.device, "--workdir", args.workdir,
                       *(["--performance", *args.performance] if args.performance else []),
                       *(["--config", *args.config] if args.config else []),
                       *(["--profile-out", args.profile_out] if args.profile_out else [])]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.run_timeout)
                except subprocess.TimeoutExpired:
                    proc = subprocess.CompletedProcess(cmd, -1, "", f"timed out after {args.run_timeout} s")
                shutil.rmtree(local, ignore_errors=True)
                if proc.returncode:
                    print(json.dumps({"method": method, "variant": variant, "batch": b, "error": proc.stderr[-2000:]}),
                          flush=True)
                    continue
                line = json.dumps({**json.loads(proc.stdout.strip().splitlines()[-1]), "flops_per_image": flops})
                print(line, flush=True)
                rows.append(json.loads(line))
                if args.json_out:
                    with open(args.json_out, "a") as f:
                        f.write(line + "\n")
    shutil.rmtree(work / "runs", ignore_errors=True)
    print()
    print(table(rows))
    if rows:
        print(f"device: {rows[0]['device']}, precision: {rows[0]['precision']}, shapes: {args.shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
