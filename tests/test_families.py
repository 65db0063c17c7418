"""models/families.py and the behaviour its rows name (models/text.py, models/unet.py, models/mmdit.py): the
family table, each family's prompt encoding and denoiser call as its pipeline makes them, SDXL's micro-conditioning
and the flow-matching objective as diffusers' SD3/Flux training scripts compute it."""

from __future__ import annotations

import pytest
import torch

from assets_pipeline.models.families import FAMILIES, get_family
from assets_pipeline.models.text import tokenize
from assets_pipeline.models.unet import sdxl_add_time_ids


def test_family_registry():
    assert set(FAMILIES) == {"sd1", "sd2", "sdxl", "sd3", "flux"}
    sdxl = get_family("sdxl")
    assert (sdxl.pipeline_class, sdxl.num_text_encoders, sdxl.tokenizer_names) == (
        "StableDiffusionXLPipeline", 2, ("tokenizer", "tokenizer_2"))
    assert [f.name for f in FAMILIES.values() if f.micro_conditioning] == ["sdxl"]
    assert [f.name for f in FAMILIES.values() if f.pooled_text] == ["sdxl", "sd3", "flux"]
    assert {f.controlnet_pipeline_class for f in FAMILIES.values()} == {
        "StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline",
        "StableDiffusion3ControlNetPipeline", "FluxControlNetPipeline"}
    assert [e.embedding_key for e in sdxl.text_encoders] == ["clip_l", "clip_g"]
    assert [e.embedding_key for e in get_family("sd3").text_encoders] == ["clip_l", "clip_g", "t5"]
    assert [e.embedding_key for e in get_family("flux").text_encoders] == ["clip_l", "t5"]
    assert get_family("sd2").resolution_for("v_prediction") == 768
    assert get_family("sd2").resolution_for("epsilon") == 512
    assert get_family("sd1").resolution_for("v_prediction") == 512
    assert get_family("flux").resolution_for("flow") == get_family("sd3").resolution_for("flow") == 1024
    # Tokens per encoder: CLIP's tokenizer decides (None); T5's is the family's max_sequence_length or the one set.
    assert sdxl.text_max_lengths(300) == (None, None) and not sdxl.has_sequence_length
    assert get_family("sd3").text_max_lengths() == (None, None, 256)
    assert get_family("flux").text_max_lengths() == (None, 512)
    assert get_family("flux").text_max_lengths(128) == (None, 128)
    # The denoiser and its objective are the family's: the U-Nets predict noise (or v) from DDPM timesteps, the
    # transformers the flow; only the DDPM objective has Min-SNR weighting.
    assert {f.denoiser.component for f in FAMILIES.values()} == {"unet", "transformer"}
    assert [f.name for f in FAMILIES.values() if not f.objective.supports_snr_gamma] == ["sd3", "flux"]
    assert [f.validation_scheduler for f in FAMILIES.values()] == ["DPMSolverMultistepScheduler"] * 3 + [None] * 2
    with pytest.raises(KeyError, match="known: \\['flux', 'sd1', 'sd2', 'sd3', 'sdxl'\\]"):
        get_family("qwen-image")


def test_sdxl_prompt_encoding_matches_the_pipeline(sdxl_pipe):
    prompts = ["a photo of sks dog", "a dog"]
    with torch.no_grad():
        ids = tokenize([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2], prompts)
        embeds, pooled = get_family("sdxl").encode_prompt([sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2], ids)
        ref_embeds, _, ref_pooled, _ = sdxl_pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                               do_classifier_free_guidance=False)
    assert embeds.shape == (2, 77, 32 + 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(embeds, ref_embeds)
    torch.testing.assert_close(pooled, ref_pooled)
    assert not torch.allclose(embeds[0], embeds[1])  # the prompts differ, so must their embeddings

    time_ids = sdxl_add_time_ids((96, 64), (8, 0), (64, 64))
    expected = sdxl_pipe._get_add_time_ids((96, 64), (8, 0), (64, 64), dtype=torch.float32,
                                           text_encoder_projection_dim=32)
    assert time_ids.tolist() == expected.tolist() == [[96, 64, 8, 0, 64, 64]]
    with pytest.raises(ValueError, match="three"):
        sdxl_add_time_ids((96, 64, 3), (0, 0), (64, 64))
    with pytest.raises(TypeError):
        sdxl_add_time_ids((96.5, 64), (0, 0), (64, 64))
    with pytest.raises(ValueError, match="2 text encoders but 1"):
        get_family("sdxl").encode_prompt([sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2], ids[:1])


def test_sd3_and_flux_prompt_encodings_match_their_pipelines(sd3_pipe, flux_pipe):
    """SD 3.x: both CLIPs' penultimate states padded to the T5 width, then T5's tokens, and both CLIPs' projections
    as the pooled embedding; Flux: T5's tokens and CLIP-L's pooled output, each as the pipeline's encode_prompt."""
    prompts = ["a photo of sks dog", "a dog"]
    sd3, flux = get_family("sd3"), get_family("flux")
    with torch.no_grad():
        ids = tokenize([sd3_pipe.tokenizer, sd3_pipe.tokenizer_2, sd3_pipe.tokenizer_3], prompts,
                       sd3.text_max_lengths(64))
        embeds, pooled = sd3.encode_prompt([sd3_pipe.text_encoder, sd3_pipe.text_encoder_2, sd3_pipe.text_encoder_3],
                                           ids)
        ref, _, ref_pooled, _ = sd3_pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                       do_classifier_free_guidance=False, max_sequence_length=64)
    assert embeds.shape == (2, 77 + 64, 128) and pooled.shape == (2, 32 + 64)
    torch.testing.assert_close(embeds, ref)
    torch.testing.assert_close(pooled, ref_pooled)
    assert ids[2].shape == (2, 64) and ids[2][0, -1] == flux_pipe.tokenizer_2.pad_token_id == 0

    with torch.no_grad():
        ids = tokenize([flux_pipe.tokenizer, flux_pipe.tokenizer_2], prompts, flux.text_max_lengths())
        embeds, pooled = flux.encode_prompt([flux_pipe.text_encoder, flux_pipe.text_encoder_2], ids)
        ref, ref_pooled, _ = flux_pipe.encode_prompt(prompts, prompts, device="cpu", max_sequence_length=512)
    assert embeds.shape == (2, 512, 128) and pooled.shape == (2, 32)
    torch.testing.assert_close(embeds, ref)
    torch.testing.assert_close(pooled, ref_pooled)
    assert not torch.allclose(embeds[0], embeds[1]) and not torch.allclose(pooled[0], pooled[1])


def _pipeline_call(pipe, **kwargs):
    """The denoiser's inputs and output in one denoising step of ``pipe`` (a forward hook on it)."""
    seen = {}

    def hook(module, args, inputs, output):
        seen.update(inputs=inputs, output=output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe("a photo of sks dog", num_inference_steps=1, height=64, width=64, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        handle.remove()
    return seen["inputs"], seen["output"]


def test_flow_denoisers_are_called_as_their_pipelines_call_them(sd3_pipe, flux_pipe):
    """The training call of each transformer gives what the stock pipeline's own call gives for the same noisy
    latents, timestep and prompt: SD 3.x's on the latents as they are; Flux's on latents packed 2x2 with their
    position ids, the timestep / 1000 and the guidance-distilled model's guidance (3.5, the scripts' default)."""
    from types import SimpleNamespace

    inputs, output = _pipeline_call(sd3_pipe, guidance_scale=1.0)  # no CFG: one row, as in training
    batch = SimpleNamespace(pooled_embeds=inputs["pooled_projections"])
    pred = get_family("sd3").denoiser.predict(sd3_pipe.transformer, inputs["hidden_states"], inputs["timestep"],
                                               inputs["encoder_hidden_states"], batch)
    torch.testing.assert_close(pred, output)

    flux = get_family("flux").denoiser
    inputs, output = _pipeline_call(flux_pipe, guidance_scale=3.5)
    side = 64 // flux_pipe.vae_scale_factor  # the latents' side (the tiny VAE halves the image once)
    noisy = flux.unpack(inputs["hidden_states"], side, side)  # the pipeline's latents, unpacked
    assert noisy.shape == (1, 16, side, side) and inputs["hidden_states"].shape == (1, side * side // 4, 64)
    torch.testing.assert_close(flux.pack(noisy), inputs["hidden_states"])  # packing is exact both ways
    assert inputs["guidance"].tolist() == [3.5]
    batch = SimpleNamespace(pooled_embeds=inputs["pooled_projections"])
    pred = flux.predict(flux_pipe.transformer, noisy, inputs["timestep"] * 1000, inputs["encoder_hidden_states"],
                        batch)
    torch.testing.assert_close(pred, flux.unpack(output, side, side))


@pytest.mark.parametrize("scheme,precondition", [("logit_normal", True), ("none", False), ("cosmap", False)])
def test_flow_matching_objective_follows_the_scripts(scheme, precondition):
    """train_dreambooth_lora_sd3.py's step, line by line: u from compute_density_for_timestep_sampling, the
    scheduler's timesteps and sigmas at u x 1000, noisy = (1 - sigma) x + sigma noise, target noise - x (or x with
    --precondition_outputs, the prediction turned into noisy - sigma x pred), weights compute_loss_weighting_for_sd3."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from assets_pipeline.models.mmdit import FlowMatchingObjective

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    objective = FlowMatchingObjective(scheme, precondition_outputs=precondition)
    g = torch.Generator().manual_seed(0)
    latents, noise, pred = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g), \
        torch.randn(4, 16, 8, 8, generator=g)
    noised = objective.noisy_input(scheduler, latents, noise, noise, torch.Generator().manual_seed(7))

    u = compute_density_for_timestep_sampling(scheme, 4, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(7))
    indices = (u * 1000).long()
    timesteps = scheduler.timesteps[indices]
    step = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]  # the script's get_sigmas
    sigmas = scheduler.sigmas[step].reshape(4, 1, 1, 1)
    assert torch.equal(noised.timesteps, timesteps) and len(set(timesteps.tolist())) > 1
    torch.testing.assert_close(noised.noisy, (1 - sigmas) * latents + sigmas * noise)
    if precondition:
        torch.testing.assert_close(noised.target, latents)
        torch.testing.assert_close(objective.prediction(pred, noised), pred * -sigmas + noised.noisy)
    else:
        torch.testing.assert_close(noised.target, noise - latents)
        assert objective.prediction(pred, noised) is pred
    weights = objective.loss_weights(scheduler, noised, None)
    expected = compute_loss_weighting_for_sd3(scheme, sigmas).flatten()
    if scheme == "cosmap":
        torch.testing.assert_close(weights, expected)
        assert not torch.allclose(weights, torch.ones(4))
    else:  # ones: no weighting
        assert weights is None and torch.equal(expected, torch.ones_like(expected))
