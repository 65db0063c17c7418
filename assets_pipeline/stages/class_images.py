"""Class images for DreamBooth's prior preservation: the frozen base model's own pictures of the class
("a photo of a dog"), so fine-tuning on "a photo of sks dog" does not make every dog look like the subject.

Each image is content-addressed by everything that determines it: base-model fingerprint, prompt, scheduler,
steps, guidance, seed and size. A second concept with the same class noun and base model generates nothing;
raising the count generates only the missing images; another base model never reuses them. Image i always
uses seed ``seed + i`` with its own generator, so it is the same whatever batch it was generated in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from assets_pipeline.hashing import digest, sha256_file
from assets_pipeline.store import ItemCache

CLASS_IMAGE_COLUMNS = ["image_sha256", "decoded_path", "caption", "seed", "cache_key"]


@dataclass(frozen=True)
class ClassImageConfig:
    num_inference_steps: int | None = field(
        default=None, metadata={"help": "Denoising steps; None = 50 (SD's default), 10 for the embedded model."}
    )
    guidance_scale: float = field(default=7.5, metadata={"help": "Classifier-free guidance (SD's default 7.5)."})
    scheduler: str | None = field(default=None, metadata={"help": "A diffusers scheduler class; None = model's."})
    seed: int = field(default=0, metadata={"help": "Image i uses seed + i."})
    batch_size: int = field(default=4, metadata={"help": "Images per forward (diffusers' sample_batch_size)."})

    def steps(self, quick: bool) -> int:
        return self.num_inference_steps or (10 if quick else 50)


def class_image_keys(base_fingerprint: str, prompt: str, count: int, resolution: int, cfg: ClassImageConfig,
                     quick: bool) -> list[tuple[int, str]]:
    return [
        (cfg.seed + i, digest("class-image", base_fingerprint, prompt, cfg.scheduler or "model-default",
                              cfg.steps(quick), cfg.guidance_scale, cfg.seed + i, resolution))
        for i in range(count)
    ]


def generate_class_images(
    load_pipeline: Callable[[], object], base_fingerprint: str, prompt: str, count: int, resolution: int,
    cfg: ClassImageConfig, cache: ItemCache, quick: bool, device: str = "cpu",
) -> pd.DataFrame:
    """Make sure ``count`` class images exist in the cache (loading the pipeline only if some are missing)."""
    import torch

    keys = class_image_keys(base_fingerprint, prompt, count, resolution, cfg, quick)
    missing = set(cache.split([k for _, k in keys]))
    todo = [(seed, key) for seed, key in keys if key in missing]
    if todo:
        pipe = load_pipeline()
        if cfg.scheduler:
            import diffusers

            pipe.scheduler = getattr(diffusers, cfg.scheduler).from_config(pipe.scheduler.config)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            images = pipe(
                [prompt] * len(batch), num_inference_steps=cfg.steps(quick), guidance_scale=cfg.guidance_scale,
                height=resolution, width=resolution,
                generator=[torch.Generator().manual_seed(seed) for seed, _ in batch],
            ).images
            for (_, key), img in zip(batch, images):
                cache.put(key, lambda tmp, img=img: img.save(tmp, format="PNG"))
    rows = []
    for seed, key in keys:
        path = cache.path(key)
        rows.append({"image_sha256": sha256_file(path), "decoded_path": str(path), "caption": prompt,
                     "seed": seed, "cache_key": key})
    return pd.DataFrame(rows, columns=CLASS_IMAGE_COLUMNS)
