"""base_model.py: the embedded tiny SD (deterministic, offline) and resolving the user's base model setting."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from assets_pipeline.base_model import (
    EMBEDDED_RESOLUTION, fingerprint_model, load_encoders, load_pipeline, resolve_base_model,
)
from assets_pipeline.hashing import digest, sha256_file


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_embedded_build_is_byte_identical_across_builds(embedded_model_dir, tmp_path):
    from assets_pipeline.base_model import ensure_embedded_model

    second = ensure_embedded_model(tmp_path / "base_models")
    first_files, second_files = files_of(embedded_model_dir), files_of(second)
    assert set(first_files) >= {"model_index.json", "unet/diffusion_pytorch_model.safetensors",
                                "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    assert first_files.keys() == second_files.keys()
    for name in first_files:
        assert first_files[name] == second_files[name], name
    assert fingerprint_model(embedded_model_dir) == fingerprint_model(second)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "base_models").iterdir())  # atomic build


def test_fingerprint_follows_weights_not_library_versions(embedded_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(embedded_model_dir, copy)
    fp = fingerprint_model(embedded_model_dir)
    assert fingerprint_model(copy) == fp  # content, not location

    config = copy / "unet" / "config.json"
    cfg = json.loads(config.read_text())
    cfg["_diffusers_version"] = "0.0.1"
    config.write_text(json.dumps(cfg))
    assert fingerprint_model(copy) == fp

    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint_model(copy) != fp


def test_embedded_loads_in_stock_diffusers(embedded_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded_model_dir, local_files_only=True)
    assert pipe.tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
    assert pipe.unet.config.sample_size * 2 == EMBEDDED_RESOLUTION
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49408


def test_tokenizer_matches_open_clips_reference(tmp_path):
    """SD's tokenizer built from open_clip's BPE file gives the same ids as open_clip's own tokenizer."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    from assets_pipeline.base_model import write_clip_tokenizer_files

    ref = SimpleTokenizer()
    text = "A photo of sks dog, naïve café-style portrait at 35mm!"
    write_clip_tokenizer_files(tmp_path)
    tok = CLIPTokenizer(f"{tmp_path}/vocab.json", f"{tmp_path}/merges.txt", pad_token="<|endoftext|>")
    ids = tok(text).input_ids
    assert ids == [ref.encoder["<start_of_text>"], *ref.encode(text), ref.encoder["<end_of_text>"]]


def test_resolve_embedded(built_models, embedded_model_dir):
    ref = resolve_base_model("embedded", built_models)
    assert (ref.kind, ref.is_random, ref.resolution) == ("embedded", True, EMBEDDED_RESOLUTION)
    assert Path(ref.location) == embedded_model_dir
    assert ref.fingerprint == fingerprint_model(embedded_model_dir)
    assert resolve_base_model("embedded", built_models, resolution=128).resolution == 128


@pytest.fixture(scope="module")
def tiny_pipe(built_models):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(resolve_base_model("embedded", built_models).location,
                                                   local_files_only=True)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resolve_local_diffusers_folder(tiny_pipe, embedded_model_dir, tmp_path):
    folder = tmp_path / "my-sd"
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    ref = resolve_base_model(str(folder), tmp_path / "art")
    assert (ref.kind, ref.is_random, ref.resolution, ref.location) == ("folder", False, 512, str(folder))
    assert ref.fingerprint == fingerprint_model(embedded_model_dir)  # same weights, same fingerprint
    assert resolve_base_model(str(folder), tmp_path / "art", resolution=256).resolution == 256
    assert same_weights(load_pipeline(ref).unet, tiny_pipe.unet)

    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        resolve_base_model(str(tmp_path / "not-a-model"), tmp_path / "art")


def test_a_checkpoint_saved_in_fp16_renders_with_fp32_trained_parts(tiny_pipe, tmp_path):
    """Many published checkpoints are fp16. The trained parts are fp32 (a ControlNet, a DreamBooth U-Net saved
    beside the base's fp16 components), so the renders (validation, base renders, changes_base_output) load the base
    in one dtype; loaded as saved, the ControlNet pipeline failed with "mat1 and mat2 must have the same dtype"."""
    import copy

    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import TrainContext
    from assets_pipeline.training.methods.controlnet import controlnet_from_unet
    from assets_pipeline.training.models import base_pipeline_loader, render_dtype
    from assets_pipeline.training.output import render_batch

    folder = tmp_path / "sd-fp16"
    copy.deepcopy(tiny_pipe).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    ref = resolve_base_model(str(folder), tmp_path / "art", resolution=64)
    from safetensors import safe_open

    for part in ("unet", "vae", "text_encoder"):
        weights = next((folder / part).glob("*.safetensors"))
        with safe_open(str(weights), "pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16, part
    ctx = TrainContext(concept="dog", token="sks", class_noun="dog", resolution=64, num_instance_images=3)
    load_base = base_pipeline_loader(dataclasses.asdict(ref), render_dtype())

    controlnet_dir = tmp_path / "controlnet"
    controlnet_from_unet(tiny_pipe.unet.float(), 2 ** (len(tiny_pipe.vae.config.block_out_channels) - 1)) \
        .save_pretrained(controlnet_dir, safe_serialization=True)
    pipe = get_method("controlnet").load_pipeline(load_base, controlnet_dir, ctx)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.controlnet)} == {torch.float32}
    from PIL import Image

    control = Image.new("RGB", (64, 64), (255, 255, 255))
    assert render_batch(pipe, [("a photo of sks dog", 0)], 64, 2, image=[control])[0].size == (64, 64)

    dreambooth_dir = tmp_path / "dreambooth"  # what DreamBoothMethod.save writes: the base with its U-Net trained
    base = load_pipeline(ref)
    base.unet = copy.deepcopy(tiny_pipe.unet).float()
    base.save_pretrained(dreambooth_dir, safe_serialization=True)
    pipe = get_method("dreambooth").load_pipeline(load_base, dreambooth_dir, ctx)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    assert render_batch(pipe, [("a photo of sks dog", 0)], 64, 2)[0].size == (64, 64)


def test_resolve_hub_id_from_local_cache(tiny_pipe, embedded_model_dir, tmp_path, monkeypatch):
    """A hub id resolves from the local HF cache (the layout huggingface_hub writes), with no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-sd"
    tiny_pipe.save_pretrained(repo / "snapshots" / commit, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    ref = resolve_base_model("acme/tiny-sd", tmp_path / "art", hub_cache_dir=str(tmp_path / "hub"))
    assert (ref.kind, ref.source) == ("hub", "acme/tiny-sd")
    assert Path(ref.location) == repo / "snapshots" / commit
    assert ref.fingerprint == fingerprint_model(embedded_model_dir)
    assert same_weights(load_pipeline(ref).vae, tiny_pipe.vae)

    with pytest.raises(LocalEntryNotFoundError):  # not in the cache: fails at once, no download attempted
        resolve_base_model("acme/not-cached", tmp_path / "art", hub_cache_dir=str(tmp_path / "hub"))


def test_single_file_checkpoint_round_trip(tiny_pipe, embedded_model_dir, tmp_path):
    """An original-layout (LDM) .safetensors loads through from_single_file with the configs from a local folder.

    The checkpoint's U-Net is changed from the folder's, so passing the test shows the weights come from the file
    and only the configs from the folder.
    """
    from safetensors.torch import save_file

    from ldm_checkpoint import pipeline_to_ldm_state_dict

    with torch.no_grad():
        original = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
        for p in tiny_pipe.unet.parameters():
            p.add_(0.5)
    try:
        ckpt = tmp_path / "tiny-sd.safetensors"
        save_file(pipeline_to_ldm_state_dict(tiny_pipe), str(ckpt))
        ref = resolve_base_model(str(ckpt), tmp_path / "art", single_file_config=str(embedded_model_dir))
        assert (ref.kind, ref.resolution, ref.single_file_config) == ("single_file", 512, str(embedded_model_dir))
        assert ref.fingerprint == digest("file", sha256_file(ckpt))

        pipe = load_pipeline(ref)
        for name in ("unet", "vae", "text_encoder"):
            assert same_weights(getattr(pipe, name), getattr(tiny_pipe, name)), name
        assert not torch.equal(pipe.unet.state_dict()["conv_in.weight"], original["conv_in.weight"])
        assert pipe.tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]

        # Without the config folder diffusers would fetch SD 1.5's configs from the hub: offline, that fails.
        with pytest.raises(LocalEntryNotFoundError):
            load_pipeline(dataclasses.replace(ref, single_file_config=None))

        enc = load_encoders(ref, tmp_path / "art")
        assert enc.vae_fingerprint == digest(ref.fingerprint, "vae")
        assert same_weights(enc.vae, tiny_pipe.vae)
    finally:
        with torch.no_grad():
            tiny_pipe.unet.load_state_dict(original)


def test_resolve_rejects_what_it_cannot_use(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_base_model(str(tmp_path / "missing.safetensors"), tmp_path / "art")
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_base_model("no such model", tmp_path / "art")
