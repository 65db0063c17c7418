"""Rendering for validation and checks: the same (prompt, seed) pairs batched through a pipeline, with the
scheduler diffusers' training scripts validate with, and the base model's renders cached by content."""

from __future__ import annotations

from pathlib import Path

from assets_pipeline.hashing import digest
from assets_pipeline.models.load import base_pipeline_loader, render_dtype
from assets_pipeline.models.resolve import BaseModelRef
from assets_pipeline.store import ItemCache

BASE_RENDER_VERSION = 3  # bump when render_batch() changes what an image of a (prompt, seed) batch is (3: the
# base pipeline in render_dtype(), fp32, also for a checkpoint saved in fp16)


def pixel_change(image, reference) -> float:
    """Mean absolute pixel difference, 0..1: how much an output changed an image against the base model's."""
    import numpy as np

    return float(np.abs(np.asarray(image, np.float32) - np.asarray(reference, np.float32)).mean() / 255)


def use_validation_scheduler(pipe) -> None:
    """The scheduler the pipeline's family validates with (``ModelFamily.validation_scheduler``), built from the
    model's scheduler config. The DDPM families: DPM-Solver++ (multistep), as diffusers' training scripts validate
    (train_dreambooth_lora.py's ``log_validation``, 25 steps; a learned variance is rendered as fixed_small), good
    samples in 15-25 steps where the model's own scheduler (PNDM for SD 1.5) needs 50. The flow-matching families
    keep their pipeline's own (FlowMatchEulerDiscreteScheduler, as train_dreambooth_lora_flux.py validates)."""
    from assets_pipeline.models.families import diffusers_class, family_of_pipeline

    name = family_of_pipeline(pipe).validation_scheduler
    if name is None or type(pipe.scheduler).__name__ == name:
        return
    args = {}
    if "variance_type" in pipe.scheduler.config:
        variance = pipe.scheduler.config.variance_type
        args["variance_type"] = "fixed_small" if variance in ("learned", "learned_range") else variance
    pipe.scheduler = diffusers_class(name).from_config(pipe.scheduler.config, **args)


def render(pipe, prompt: str, seed: int, resolution: int, steps: int, **kwargs):
    """One image for a fixed prompt and seed (CPU generator, so the same seed gives the same noise anywhere)."""
    return render_batch(pipe, [(prompt, seed)], resolution, steps, **kwargs)[0]


def render_batch(pipe, pairs: list[tuple[str, int]], resolution: int, steps: int, **kwargs) -> list:
    """Images for (prompt, seed) pairs in one pipeline call: one U-Net batch per denoising step instead of a
    call per image. Each image's starting noise comes from its own CPU generator seeded with its seed, exactly
    the noise a single render with that seed starts from. ``kwargs`` values that differ per image are lists."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    use_validation_scheduler(pipe)
    return pipe([p for p, _ in pairs], num_inference_steps=steps, height=resolution, width=resolution,
                generator=[torch.Generator().manual_seed(s) for _, s in pairs], **kwargs).images


class BaseRenders:
    """The base model's images for fixed (prompt, seed) pairs, size and steps: what every validation and the
    ``changes_base_output`` check compare a trained output with. They depend on nothing trained, so they are
    content-addressed in the artifact root's cache (``cache/base_renders/``: base-model fingerprint, the batch's
    prompts and seeds, size, steps, device kind, torch version) and rendered once per base model; the base
    pipeline is loaded only on a miss. ``cache=None`` renders every time."""

    def __init__(self, base_model: BaseModelRef, device: str, cache: ItemCache | None):
        self.base_model, self.device, self.cache = base_model, device, cache
        self._pipe = None

    @staticmethod
    def cache_for(artifact_root: str | Path) -> ItemCache:
        return ItemCache(Path(artifact_root), "base_renders", ".png")

    def _loader(self):
        return base_pipeline_loader(self.base_model, render_dtype())

    def pipe(self):
        if self._pipe is None:
            self._pipe = self._loader()().to(self.device)
        return self._pipe

    def take_pipe(self):
        """A loader (``load_base``) of the base pipeline for renders: the one the renders loaded (on a cache miss),
        handed over once, since whoever takes it may change it (load an adapter into it); else a fresh load."""
        pipe, self._pipe = self._pipe, None
        return self._loader() if pipe is None else (lambda: pipe)

    def key(self, pairs: list[tuple[str, int]], index: int, resolution: int, steps: int) -> str:
        """Image ``index`` of the batch ``pairs`` (the whole batch is in the key: a batched forward may round
        differently from another batch's)."""
        import torch

        return digest("base-render", BASE_RENDER_VERSION, self.base_model.fingerprint, [list(p) for p in pairs],
                      index, resolution, steps, "cuda" if str(self.device).startswith("cuda") else str(self.device),
                      torch.__version__)

    def __call__(self, pairs: list[tuple[str, int]], resolution: int, steps: int) -> list:
        from PIL import Image

        if self.cache is None:
            return render_batch(self.pipe(), pairs, resolution, steps)
        keys = [self.key(pairs, i, resolution, steps) for i in range(len(pairs))]
        if missing := set(self.cache.split(keys)):
            for key, img in zip(keys, render_batch(self.pipe(), pairs, resolution, steps)):
                if key in missing:  # PNG: lossless, the rendered pixels exactly
                    self.cache.put(key, lambda tmp, img=img: img.save(tmp, format="PNG"))
        out = []
        for key in keys:
            with Image.open(self.cache.path(key)) as img:
                out.append(img.convert("RGB"))
        return out
