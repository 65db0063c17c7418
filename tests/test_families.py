"""models/families.py and the behaviour its rows name (models/text.py, models/unet.py): the family table, SDXL's
prompt encoding and micro-conditioning as its pipeline makes them, and how a U-Net family's denoiser is called."""

from __future__ import annotations

import pytest
import torch

from assets_pipeline.models.families import FAMILIES, get_family
from assets_pipeline.models.text import tokenize
from assets_pipeline.models.unet import sdxl_add_time_ids


def test_family_registry():
    assert set(FAMILIES) == {"sd1", "sd2", "sdxl"}
    sdxl = get_family("sdxl")
    assert (sdxl.pipeline_class, sdxl.num_text_encoders, sdxl.tokenizer_names) == (
        "StableDiffusionXLPipeline", 2, ("tokenizer", "tokenizer_2"))
    assert [f.name for f in FAMILIES.values() if f.micro_conditioning] == ["sdxl"]
    assert [f.name for f in FAMILIES.values() if f.pooled_text] == ["sdxl"]
    assert {f.controlnet_pipeline_class for f in FAMILIES.values()} == {
        "StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline"}
    assert [e.embedding_key for e in sdxl.text_encoders] == ["clip_l", "clip_g"]
    assert get_family("sd2").resolution_for("v_prediction") == 768
    assert get_family("sd2").resolution_for("epsilon") == 512
    assert get_family("sd1").resolution_for("v_prediction") == 512
    with pytest.raises(KeyError, match="known: \\['sd1', 'sd2', 'sdxl'\\]"):
        get_family("sd3")


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
