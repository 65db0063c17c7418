"""models/resolve.py: a configured source resolved (embedded, a local folder, a hub id in the local cache, a single
file), its fingerprint, the deployment's default and a concept's own ``[base_model]``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from assets_pipeline.hashing import digest, sha256_file
from assets_pipeline.models.embedded import EMBEDDED_MODELS, EMBEDDED_SDXL, RESOLUTION
from assets_pipeline.models.load import load_pipeline
from assets_pipeline.models.resolve import BASE_MODEL_ENV, fingerprint_model, resolve_base_model
from helpers import edited_copy, same_weights


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


def test_resolve_embedded(built_models, embedded_model_dir):
    ref = resolve_base_model("embedded", built_models)
    assert (ref.kind, ref.is_random, ref.resolution) == ("embedded", True, RESOLUTION["tiny"])
    assert Path(ref.location) == embedded_model_dir
    assert ref.fingerprint == fingerprint_model(embedded_model_dir)
    assert resolve_base_model("embedded", built_models, resolution=128).resolution == 128


def test_embedded_families(models_root, sdxl_ref):
    sd1 = resolve_base_model("embedded", models_root)
    assert (sd1.kind, sd1.family, sd1.prediction_type, sd1.resolution) == ("embedded", "sd1", "epsilon", 64)
    assert (sdxl_ref.kind, sdxl_ref.is_random, sdxl_ref.family, sdxl_ref.prediction_type, sdxl_ref.resolution) == (
        "embedded", True, "sdxl", "epsilon", RESOLUTION["tiny-sdxl"])
    assert Path(sdxl_ref.location) == models_root / "base_models" / EMBEDDED_MODELS[EMBEDDED_SDXL][0]
    assert sdxl_ref.fingerprint == fingerprint_model(Path(sdxl_ref.location))


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


@pytest.mark.parametrize("case, edits, expected", [
    ("sd1", {}, ("sd1", "epsilon", 512)),
    ("sd2-v", {"unet/config.json": {"cross_attention_dim": 1024},
               "scheduler/scheduler_config.json": {"prediction_type": "v_prediction"}}, ("sd2", "v_prediction", 768)),
    ("sd2-base", {"unet/config.json": {"cross_attention_dim": 1024}}, ("sd2", "epsilon", 512)),
    ("sd1-v", {"scheduler/scheduler_config.json": {"prediction_type": "v_prediction"}}, ("sd1", "v_prediction", 512)),
])
def test_folder_family_from_configs(embedded_model_dir, tmp_path, case, edits, expected):
    folder = edited_copy(embedded_model_dir, tmp_path / case, edits)
    ref = resolve_base_model(str(folder), tmp_path / "art")
    assert (ref.family, ref.prediction_type, ref.resolution) == expected
    assert resolve_base_model(str(folder), tmp_path / "art", resolution=256).resolution == 256
    assert ref.describe()["family"] == expected[0]


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

        from assets_pipeline.stages.latents import load_encoders

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


def test_env_var_sets_the_default_source(models_root, monkeypatch):
    from assets_pipeline.resources import BaseModelResource

    monkeypatch.delenv(BASE_MODEL_ENV, raising=False)
    assert BaseModelResource().resolve(models_root).family == "sd1"  # unset: the embedded SD model
    monkeypatch.setenv(BASE_MODEL_ENV, "embedded-sdxl")
    ref = BaseModelResource().resolve(models_root)
    assert (ref.source, ref.family) == ("embedded-sdxl", "sdxl")
    assert BaseModelResource(source="embedded").resolve(models_root).family == "sd1"  # explicit config wins
    monkeypatch.setenv(BASE_MODEL_ENV, "no such model")
    with pytest.raises(FileNotFoundError, match="'no such model'"):
        BaseModelResource().resolve(models_root)
    assert BASE_MODEL_ENV in BaseModelResource.model_fields["source"].description


def test_a_concepts_base_model_section_wins_for_that_concept_only(models_root, monkeypatch):
    from assets_pipeline.concept import ConceptSpecError
    from assets_pipeline.partitions.concept_spec import parse_concept_toml
    from assets_pipeline.resources import BaseModelResource

    monkeypatch.setenv(BASE_MODEL_ENV, "embedded")
    xl = parse_concept_toml("xl", 'token = "sks"\n[base_model]\nsource = "embedded-sdxl"\n')
    plain = parse_concept_toml("plain", 'token = "sks"\n')
    deployment = BaseModelResource(source="embedded", resolution=48)
    ref = deployment.resolve(models_root, xl)
    # The concept's model at its family's (here: the embedded model's) resolution, not the deployment's 48 px.
    assert (ref.source, ref.family, ref.resolution) == ("embedded-sdxl", "sdxl", 64)
    plain_ref = deployment.resolve(models_root, plain)
    assert (plain_ref.family, plain_ref.resolution) == ("sd1", 48)
    assert deployment.resolve(models_root).family == "sd1"
    for text, message in [
        ('[base_model]\nsource = 5', r"xl/concept.toml \[base_model\].*source = 5 is int, expected a string"),
        ('[base_model]\nmodel = "x"', r"\[base_model\].*unknown.*'model'"),
        ('[base_model]\nsingle_file_config = "/cfg"', "single_file_config is set but source is empty"),
    ]:
        with pytest.raises(ConceptSpecError, match=message):
            parse_concept_toml("xl", 'token = "sks"\n' + text)
    # Issue 28, point 12: a model that is not there is refused where the concept is read, not at its first stage.
    for source, message in [
        ("/no/such/model.safetensors", "single-file checkpoint /no/such/model.safetensors does not exist"),
        ("/no/such/folder", "source = '/no/such/folder' does not exist: expected one of"),
        (str(models_root), "is a folder but not a diffusers pipeline"),
    ]:
        with pytest.raises(ConceptSpecError, match=rf"xl/concept.toml \[base_model\]: .*{message}"):
            parse_concept_toml("xl", f'token = "sks"\n[base_model]\nsource = "{source}"\n')
    with pytest.raises(ConceptSpecError, match="single_file_config = '/cfg' is not a diffusers folder"):
        parse_concept_toml("xl", 'token = "sks"\n[base_model]\nsource = "x/y"\nsingle_file_config = "/cfg"\n')
    assert parse_concept_toml("xl", 'token = "sks"\n[base_model]\nsource = "org/model"\n')  # a hub id: at resolve
    # A model removed after the concept was read (its snapshot still names it): resolving says which.
    missing = dataclasses.replace(plain, overrides={"base_model": {"source": "/no/such/model.safetensors"}})
    with pytest.raises(FileNotFoundError, match="/no/such/model.safetensors"):
        deployment.resolve(models_root, missing)


def test_the_demo_sdxl_concept_is_on_the_embedded_sdxl_in_several_buckets(models_root, tmp_path):
    from PIL import Image, ImageOps

    from assets_pipeline.demo_data import DEMO_SDXL_CONCEPT, GOOD_PHOTOS, demo_sdxl_files, write_demo_concept
    from assets_pipeline.partitions.concept_spec import load_concept_spec
    from assets_pipeline.resources import BaseModelResource
    from assets_pipeline.stages.buckets import assign_bucket, bucket_set
    from assets_pipeline.stages.curation import QualityConfig

    folder = write_demo_concept(tmp_path / "data", DEMO_SDXL_CONCEPT, demo_sdxl_files())
    spec = load_concept_spec(folder)
    ref = BaseModelResource(source="embedded").resolve(models_root, spec)
    assert (ref.family, ref.resolution) == ("sdxl", 64)
    assert set(spec.methods) == {"lora", "dreambooth", "textual_inversion", "controlnet"}
    buckets = bucket_set(ref.resolution, QualityConfig().max_aspect_ratio)
    sizes = [ImageOps.exif_transpose(Image.open(folder / name)).size for name in GOOD_PHOTOS]
    assert len({assign_bucket(w, h, buckets) for w, h in sizes}) >= 3  # square, landscape and portrait photos
