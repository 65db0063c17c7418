"""training/render.py: the base model's validation renders are content-addressed (rendered once, then read back
identical), and renders use the scheduler diffusers' training scripts validate with."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import link_models


def test_base_render_is_cached_and_identical_to_a_fresh_render(built_models, tmp_path):
    from assets_pipeline.models.load import base_pipeline_loader
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.training.render import BaseRenders, render

    root = link_models(built_models, tmp_path / "artifacts")
    ref = resolve_base_model("embedded", root)
    first = BaseRenders(ref, "cpu", BaseRenders.cache_for(root))
    pairs = [("a photo of sks dog", 3), ("a photo of sks dog, at the beach", 5)]
    images = first(pairs, 64, 2)
    assert (first.cache.computed, first.cache.cached) == (2, 0)

    again = BaseRenders(ref, "cpu", BaseRenders.cache_for(root))
    cached = again(pairs, 64, 2)
    assert (again.cache.computed, again.cache.cached) == (0, 2) and again._pipe is None  # no model loaded
    pipe = base_pipeline_loader(ref)()
    for (prompt, seed), image, hit in zip(pairs, images, cached):
        # What was rendered, what the cache gives back, and a render of that image alone: the same pixels, up to
        # the rounding a batch of two may do differently (a few levels of 255, where the images differ by far more).
        assert np.array_equal(np.asarray(image), np.asarray(hit))
        alone = np.asarray(render(pipe, prompt, seed, 64, 2), np.int16)
        assert np.abs(alone - np.asarray(hit, np.int16)).max() <= 2
    assert np.abs(np.asarray(cached[0], np.int16) - np.asarray(cached[1], np.int16)).mean() > 5
    # Another batch, step count or base model is another entry.
    key = again.key(pairs, 0, 64, 2)
    assert len({key, again.key(pairs[:1], 0, 64, 2), again.key(pairs, 0, 64, 3),
                BaseRenders(replace(ref, fingerprint="0" * 64), "cpu", None).key(pairs, 0, 64, 2)}) == 4


def test_validation_renders_with_the_familys_scheduler(tiny_pipe, flux_pipe):
    """The DDPM families render with DPM-Solver++ built from the model's scheduler config; the flow-matching ones
    keep their pipeline's flow-matching Euler scheduler."""
    from diffusers import (
        DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, PNDMScheduler,
        StableDiffusionPipeline,
    )

    from assets_pipeline.training.render import use_validation_scheduler

    pipe = StableDiffusionPipeline(**{**tiny_pipe.components, "scheduler": PNDMScheduler(
        prediction_type="v_prediction", beta_schedule="scaled_linear")})
    use_validation_scheduler(pipe)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    learned = StableDiffusionPipeline(**{**tiny_pipe.components, "scheduler": DDPMScheduler(
        variance_type="learned_range")})
    use_validation_scheduler(learned)  # as train_dreambooth_lora.py: a learned variance is rendered fixed_small
    assert learned.scheduler.config.variance_type == "fixed_small"
    flux = FluxPipeline(**flux_pipe.components)
    use_validation_scheduler(flux)
    assert type(flux.scheduler) is FlowMatchEulerDiscreteScheduler and flux.scheduler is flux_pipe.scheduler
    with pytest.raises(TypeError, match="SimpleNamespace is not the pipeline of any family"):
        use_validation_scheduler(SimpleNamespace(scheduler=PNDMScheduler()))
