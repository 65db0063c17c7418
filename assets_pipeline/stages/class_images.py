"""Class images for DreamBooth's prior preservation: the frozen base model's own pictures of the class
("a photo of a dog"), so fine-tuning on "a photo of sks dog" does not make every dog look like the subject.

Each image is content-addressed by everything that determines its pixels: base-model fingerprint, prompt,
scheduler, steps, guidance, seed, size and compute dtype. A second concept with the same class noun and base
model generates nothing; raising the count generates only the missing images; another base model never reuses
them. Image i always uses seed ``seed + i`` with its own generator, so it is the same sample whatever batch it
was generated in. Batch size and torch.compile choose kernels, not the sample, so they stay out of the key: a
kernel picked for another batch shape may round differently (MKL's sgemm does on the CPU), at most one level in
a few pixels.

Defaults for a real model trade diffusers' reference settings (train_dreambooth.py: the model's scheduler,
50 steps, sample batch 4, fp16 on CUDA) for DPM-Solver++ at 25 steps, batches of 16 and bf16 on CUDA. The
flow-matching families (SD 3.x, Flux) sample with their own flow-matching Euler scheduler at their pipeline's
steps and guidance (28; SD 3.x 7.0, Flux 3.5), as train_dreambooth_lora_sd3.py / _flux.py generate class images.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from assets_pipeline.concept import config_section
from assets_pipeline.hashing import digest, sha256_file
from assets_pipeline.models.families import ModelFamily, get_family
from assets_pipeline.parallel import image_threads
from assets_pipeline.store import ItemCache

CLASS_IMAGE_COLUMNS = ["image_sha256", "decoded_path", "caption", "seed", "cache_key"]
MODEL_SCHEDULER = "model"
DPM_SOLVER = "DPMSolverMultistepScheduler"
DTYPES = ("float32", "bfloat16", "float16")
# torch.compile of SD 1.5's U-Net: ~55 s once, then 0.05 s less per image on an H100 (see `compile`).
COMPILE_MIN_IMAGES = 1000


def _check(key: str, ok: bool, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"[class_images] {key} = {value!r} is invalid: expected {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@config_section("class_images")
@dataclass(frozen=True)
class ClassImageConfig:
    num_inference_steps: int | None = field(default=None, metadata={"help": (
        "Denoising steps. None = 25 with DPM-Solver++ (Lu et al. 2022, 'DPM-Solver++': high-quality guided "
        "samples from latent diffusion in 15-20 steps; 25 keeps a margin), else the family's pipeline default "
        "(50 for SD 1.x/2.x/SDXL, diffusers' and train_dreambooth.py's; 28 for SD 3.x and Flux: set 4 for Flux.1 "
        "schnell), 10 for the embedded random models.")})
    guidance_scale: float | None = field(default=None, metadata={"help": (
        "Classifier-free guidance; None = the family's pipeline default (SD 1.x/2.x/SDXL 7.5, SD 3.x 7.0, Flux.1 "
        "3.5: dev's guidance embedding; schnell has none and ignores it).")})
    scheduler: str | None = field(default=None, metadata={"help": (
        f"None = {DPM_SOLVER} with algorithm_type 'dpmsolver++' for a real SD 1.x/2.x/SDXL model, the model's own "
        f"for the embedded ones and the flow-matching families (SD 3.x, Flux); '{MODEL_SCHEDULER}' = the model's "
        "own scheduler (reproduces train_dreambooth.py, PNDM for SD 1.5, with 50 steps); or any diffusers scheduler "
        "class name, built from the model's scheduler config.")})
    seed: int = field(default=0, metadata={"help": "Image i uses its own generator seeded seed + i."})
    batch_size: int | str = field(default="auto", metadata={"help": (
        "Images per pipeline call. 'auto' = 16 on CUDA (32 U-Net samples with guidance keep an H100 busy at "
        "512 px; 11.6 GiB peak in bf16 for SD 1.5, so it fits 16 GB cards too), 4 on CPU "
        "(train_dreambooth.py's sample_batch_size).")})
    dtype: str = field(default="auto", metadata={"help": (
        f"Compute dtype, one of {DTYPES} or 'auto' = bfloat16 on CUDA where supported, else float32. "
        "'float16' on CUDA reproduces train_dreambooth.py. Enters the cache key: another dtype gives other pixels.")})
    compile: bool | str = field(default="auto", metadata={"help": (
        "torch.compile the U-Net: true, false, or 'auto' = on CUDA when at least "
        f"{COMPILE_MIN_IMAGES} images are missing. Measured with benchmarks/bench_class_images.py (SD 1.5 "
        "shapes, bf16, batch 16, H100): compiling adds ~55 s of warm-up and raises 5.6 to 7.8 images/s, i.e. "
        "saves 0.05 s per image, so it pays back after ~1,100 images; diffusers' default 100 class images "
        "never reach that.")})

    def __post_init__(self) -> None:
        n = self.num_inference_steps
        _check("num_inference_steps", n is None or (_is_int(n) and n >= 1), n, "a positive integer or unset")
        g = self.guidance_scale
        _check("guidance_scale", g is None or (isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0),
               g, "a number >= 0 (<= 1 turns guidance off) or unset")
        s = self.scheduler
        _check("scheduler", s is None or (isinstance(s, str) and (s == MODEL_SCHEDULER or
                                                                   re.fullmatch(r"[A-Z]\w*Scheduler", s))), s,
               f"'{MODEL_SCHEDULER}' or a diffusers scheduler class name such as '{DPM_SOLVER}'")
        _check("seed", _is_int(self.seed) and self.seed >= 0, self.seed, "an integer >= 0")
        b = self.batch_size
        _check("batch_size", b == "auto" or (_is_int(b) and b >= 1), b, "'auto' or a positive integer")
        _check("dtype", self.dtype == "auto" or self.dtype in DTYPES, self.dtype, f"'auto' or one of {DTYPES}")
        c = self.compile
        _check("compile", isinstance(c, bool) or c == "auto", c, "true, false or 'auto'")

    def sampling(self, device: str, quick: bool, family: ModelFamily | None = None) -> Sampling:
        """The settings that determine the pixels, with 'auto' and None resolved for ``device`` and the base
        model's ``family`` (None = SD 1.x's)."""
        family = family or get_family("sd1")
        fast = family.validation_scheduler  # the DDPM families' DPM-Solver++; None: the model's own (flow matching)
        scheduler = self.scheduler or (MODEL_SCHEDULER if quick or fast is None else fast)
        steps = self.num_inference_steps or (10 if quick else 25 if scheduler == DPM_SOLVER else family.sampling_steps)
        guidance = family.guidance_scale if self.guidance_scale is None else self.guidance_scale
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if _is_cuda(device) and _cuda_bf16_supported() else "float32"
        return Sampling(scheduler, steps, float(guidance), dtype)

    def resolved_batch_size(self, device: str) -> int:
        return self.batch_size if self.batch_size != "auto" else (16 if _is_cuda(device) else 4)

    def resolved_compile(self, device: str, num_images: int) -> bool:
        return self.compile if self.compile != "auto" else _is_cuda(device) and num_images >= COMPILE_MIN_IMAGES


@dataclass(frozen=True)
class Sampling:
    scheduler: str  # MODEL_SCHEDULER or a diffusers scheduler class name
    steps: int
    guidance_scale: float
    dtype: str

    def key_parts(self) -> tuple:
        # DPM-Solver is always built as dpmsolver++ here; the key says so, in case that choice ever changes.
        scheduler = f"{DPM_SOLVER}/dpmsolver++" if self.scheduler == DPM_SOLVER else self.scheduler
        return scheduler, self.steps, self.guidance_scale, self.dtype


def _is_cuda(device: str) -> bool:
    return device.split(":")[0] == "cuda"


def _cuda_bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def class_image_keys(base_fingerprint: str, prompt: str, count: int, resolution: int, cfg: ClassImageConfig,
                     quick: bool, device: str = "cpu", family: ModelFamily | None = None) -> list[tuple[int, str]]:
    parts = cfg.sampling(device, quick, family).key_parts()
    return [(cfg.seed + i, digest("class-image", base_fingerprint, prompt, *parts, cfg.seed + i, resolution))
            for i in range(count)]


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace the pipeline's scheduler by ``name``, built from the model's scheduler config as diffusers' docs
    do (``from_config``: betas and prediction type stay the model's)."""
    if name == MODEL_SCHEDULER:
        return
    import diffusers

    cls = getattr(diffusers, name, None)
    _check("scheduler", isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin), name,
           f"'{MODEL_SCHEDULER}' or a scheduler class that diffusers {diffusers.__version__} exports")
    extra = {"algorithm_type": "dpmsolver++"} if name == DPM_SOLVER else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def generate_class_images(
    load_pipeline: Callable[[Any], Any], base_fingerprint: str, prompt: str, count: int, resolution: int,
    cfg: ClassImageConfig, cache: ItemCache, quick: bool, device: str = "cpu",
    progress: Callable[[int, int], None] | None = None, family: ModelFamily | None = None,
) -> pd.DataFrame:
    """Make sure ``count`` class images exist in the cache, loading the pipeline (``load_pipeline(torch_dtype)``)
    only if some are missing. ``progress(done, total)`` is called after each batch."""
    from assets_pipeline.models.load import resolve_device

    device = resolve_device(device)
    keys = class_image_keys(base_fingerprint, prompt, count, resolution, cfg, quick, device, family)
    missing = set(cache.split([k for _, k in keys]))
    todo = [(seed, key) for seed, key in keys if key in missing]
    if todo:
        _generate(load_pipeline, prompt, todo, resolution, cfg, cache, quick, device, progress, family)
    rows = []
    for seed, key in keys:
        path = cache.path(key)
        rows.append({"image_sha256": sha256_file(path), "decoded_path": str(path), "caption": prompt,
                     "seed": seed, "cache_key": key})
    return pd.DataFrame(rows, columns=CLASS_IMAGE_COLUMNS)


def _generate(load_pipeline, prompt, todo, resolution, cfg, cache, quick, device, progress, family) -> None:
    import torch

    sampling = cfg.sampling(device, quick, family)
    batch_size = cfg.resolved_batch_size(device)
    compiled = cfg.resolved_compile(device, len(todo))
    pipe = load_pipeline(getattr(torch, sampling.dtype))
    set_scheduler(pipe, sampling.scheduler)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        # In place: the pipeline keeps its denoiser (UNet2DConditionModel or transformer: config, dtype, device).
        getattr(pipe, (family or get_family("sd1")).denoiser.component).compile()

    # PNG encoding costs ~50 ms of CPU per 512 px image, a quarter of the ~180 ms an H100 takes to generate one;
    # zlib releases the GIL, so a few threads encode batch k while the GPU generates batch k + 1.
    pending: list[tuple[str, Future]] = []

    def store(done: list[tuple[str, Future]]) -> None:
        for key, png in done:
            cache.put(key, lambda tmp, data=png.result(): tmp.write_bytes(data))

    with ThreadPoolExecutor(max_workers=image_threads()) as encoder:  # assets_pipeline/parallel.py
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            seeds = [seed for seed, _ in batch]
            if compiled:  # a last, smaller batch would be another shape: a second compile costs more than padding
                seeds += [seeds[-1]] * (batch_size - len(batch))
            images = pipe(
                [prompt] * len(seeds), num_inference_steps=sampling.steps, guidance_scale=sampling.guidance_scale,
                height=resolution, width=resolution,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            ).images
            store(pending)
            pending = [(key, encoder.submit(_png, img)) for (_, key), img in zip(batch, images)]
            if progress:
                progress(start + len(batch), len(todo))
        store(pending)
