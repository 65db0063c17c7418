"""The random-weight real-size models the GPU benchmarks and scripts/gpu_e2e.py train (assets_pipeline.model_shapes):
each has its published model's parameter count per component and runs a forward at its resolution. Built on
PyTorch's meta device, so nothing is allocated: shapes are checked, not values."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("shapes", ["sd15", "sdxl"])
def test_real_size_models_have_the_published_shapes_and_run_a_forward(shapes):
    import torch

    from assets_pipeline.model_shapes import PARAMETERS, RESOLUTION, build_pipeline

    pipe = build_pipeline(shapes, "meta")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in PARAMETERS[shapes]}
    assert counts == PARAMETERS[shapes]
    res = RESOLUTION[shapes]
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    with torch.device("meta"):
        latents = pipe.vae.encode(torch.randn(2, 3, res, res)).latent_dist.mean
        assert latents.shape == (2, 4, res // factor, res // factor)
        ids = torch.zeros(2, 77, dtype=torch.long)
        if shapes == "sdxl":  # both towers' penultimate states, the second's pooled projection, six time ids
            first = pipe.text_encoder(ids, output_hidden_states=True)
            second = pipe.text_encoder_2(ids, output_hidden_states=True)
            embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            extra = {"added_cond_kwargs": {"text_embeds": second.text_embeds, "time_ids": torch.zeros(2, 6)}}
            assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
        else:
            embeds, extra = pipe.text_encoder(ids)[0], {}
        assert embeds.shape == (2, 77, pipe.unet.config.cross_attention_dim)
        pred = pipe.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=embeds, **extra).sample
    assert pred.shape == latents.shape and pred.device.type == "meta"
