"""families.py and the family-aware parts of base_model.py: detecting SD 1.x / SD 2.x / SDXL from configs, the
embedded tiny SDXL (deterministic, stock-loadable), loading by family, SDXL text encoding, SGM single files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from assets_pipeline.base_model import (
    BASE_MODEL_ENV, EMBEDDED_SDXL_NAME, EMBEDDED_SDXL_RESOLUTION, ensure_embedded_sdxl_model, fingerprint_model,
    load_pipeline, load_tokenizer, load_tokenizers, resolve_base_model,
)
from assets_pipeline.families import (
    FAMILIES, detect_checkpoint_family, encode_sdxl_prompt, get_family, sdxl_add_time_ids, tokenize,
)
from conftest import link_models


@pytest.fixture(scope="module")
def root(built_models, tmp_path_factory) -> Path:
    """An artifact root with the session's embedded SD model linked in and the embedded SDXL built once."""
    root = link_models(built_models, tmp_path_factory.mktemp("families") / "artifacts")
    ensure_embedded_sdxl_model(root / "base_models")
    return root


@pytest.fixture(scope="module")
def sdxl_ref(root):
    return resolve_base_model("embedded-sdxl", root)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_ref):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_ref.location, local_files_only=True)


def edited_copy(src: Path, dst: Path, edits: dict[str, dict]) -> Path:
    """A copy of a pipeline folder with some config keys changed (detection reads configs only)."""
    shutil.copytree(src, dst)
    for rel, changes in edits.items():
        path = dst / rel
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return dst


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_family_registry():
    assert set(FAMILIES) == {"sd1", "sd2", "sdxl"}
    sdxl = get_family("sdxl")
    assert (sdxl.pipeline_class, sdxl.num_text_encoders, sdxl.tokenizers) == (
        "StableDiffusionXLPipeline", 2, ("tokenizer", "tokenizer_2"))
    assert [f.name for f in FAMILIES.values() if f.text_time_conditioning] == ["sdxl"]
    assert get_family("sd2").resolution_for("v_prediction") == 768
    assert get_family("sd2").resolution_for("epsilon") == 512
    assert get_family("sd1").resolution_for("v_prediction") == 512
    with pytest.raises(KeyError, match="known: \\['sd1', 'sd2', 'sdxl'\\]"):
        get_family("sd3")


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


def test_embedded_families(root, sdxl_ref):
    sd1 = resolve_base_model("embedded", root)
    assert (sd1.kind, sd1.family, sd1.prediction_type, sd1.resolution) == ("embedded", "sd1", "epsilon", 64)
    assert (sdxl_ref.kind, sdxl_ref.is_random, sdxl_ref.family, sdxl_ref.prediction_type, sdxl_ref.resolution) == (
        "embedded", True, "sdxl", "epsilon", EMBEDDED_SDXL_RESOLUTION)
    assert Path(sdxl_ref.location) == root / "base_models" / EMBEDDED_SDXL_NAME
    assert sdxl_ref.fingerprint == fingerprint_model(Path(sdxl_ref.location))


def test_sdxl_folder_detected_by_class_or_text_time(sdxl_ref, tmp_path):
    copy = resolve_base_model(str(edited_copy(Path(sdxl_ref.location), tmp_path / "xl", {})), tmp_path / "art")
    assert (copy.kind, copy.family, copy.resolution) == ("folder", "sdxl", 1024)  # the family's default

    # text_time on the U-Net alone is enough (a folder saved by another pipeline class, e.g. img2img)
    other = edited_copy(Path(sdxl_ref.location), tmp_path / "xl-img2img",
                        {"model_index.json": {"_class_name": "StableDiffusionXLImg2ImgPipeline"}})
    assert resolve_base_model(str(other), tmp_path / "art").family == "sdxl"

    broken = edited_copy(Path(sdxl_ref.location), tmp_path / "broken",
                         {"unet/config.json": {"addition_embed_type": None}})
    with pytest.raises(ValueError, match=r"StableDiffusionXLPipeline.*unet/config.json.*addition_embed_type"):
        resolve_base_model(str(broken), tmp_path / "art")
    bad_pred = edited_copy(Path(sdxl_ref.location), tmp_path / "bad-pred",
                           {"scheduler/scheduler_config.json": {"prediction_type": "flow"}})
    with pytest.raises(ValueError, match=r"scheduler_config.json: prediction_type = 'flow'"):
        resolve_base_model(str(bad_pred), tmp_path / "art")


def test_env_var_sets_the_default_source(root, monkeypatch):
    from assets_pipeline.resources import BaseModelResource

    monkeypatch.delenv(BASE_MODEL_ENV, raising=False)
    assert BaseModelResource().resolve(root).family == "sd1"  # unset: the embedded SD model
    monkeypatch.setenv(BASE_MODEL_ENV, "embedded-sdxl")
    ref = BaseModelResource().resolve(root)
    assert (ref.source, ref.family) == ("embedded-sdxl", "sdxl")
    assert BaseModelResource(source="embedded").resolve(root).family == "sd1"  # explicit config wins
    monkeypatch.setenv(BASE_MODEL_ENV, "no such model")
    with pytest.raises(FileNotFoundError, match="'no such model'"):
        BaseModelResource().resolve(root)
    assert BASE_MODEL_ENV in BaseModelResource.model_fields["source"].description


def test_a_concepts_base_model_section_wins_for_that_concept_only(root, monkeypatch):
    from assets_pipeline.partitions.concept_spec import ConceptSpecError, parse_concept_toml
    from assets_pipeline.resources import BaseModelResource

    monkeypatch.setenv(BASE_MODEL_ENV, "embedded")
    xl = parse_concept_toml("xl", 'token = "sks"\n[base_model]\nsource = "embedded-sdxl"\n')
    plain = parse_concept_toml("plain", 'token = "sks"\n')
    deployment = BaseModelResource(source="embedded", resolution=48)
    ref = deployment.resolve(root, xl)
    # The concept's model at its family's (here: the embedded model's) resolution, not the deployment's 48 px.
    assert (ref.source, ref.family, ref.resolution) == ("embedded-sdxl", "sdxl", 64)
    assert (deployment.resolve(root, plain).family, deployment.resolve(root, plain).resolution) == ("sd1", 48)
    assert deployment.resolve(root).family == "sd1"
    for text, message in [
        ('[base_model]\nsource = 5', r"xl/concept.toml \[base_model\].*source = 5 is int, expected a string"),
        ('[base_model]\nmodel = "x"', r"\[base_model\].*unknown.*'model'"),
        ('[base_model]\nsingle_file_config = "/cfg"', "single_file_config is set but source is empty"),
    ]:
        with pytest.raises(ConceptSpecError, match=message):
            parse_concept_toml("xl", 'token = "sks"\n' + text)
    missing = parse_concept_toml("xl", 'token = "sks"\n[base_model]\nsource = "/no/such/model.safetensors"\n')
    with pytest.raises(FileNotFoundError, match="/no/such/model.safetensors"):
        deployment.resolve(root, missing)


def test_the_demo_sdxl_concept_is_on_the_embedded_sdxl_in_several_buckets(root, tmp_path):
    from PIL import Image, ImageOps

    from assets_pipeline.demo_data import DEMO_SDXL_CONCEPT, GOOD_PHOTOS, demo_sdxl_files, write_demo_concept
    from assets_pipeline.partitions.concept_spec import load_concept_spec
    from assets_pipeline.resources import BaseModelResource
    from assets_pipeline.stages.buckets import assign_bucket, bucket_set
    from assets_pipeline.stages.curation import QualityConfig

    folder = write_demo_concept(tmp_path / "data", DEMO_SDXL_CONCEPT, demo_sdxl_files())
    spec = load_concept_spec(folder)
    ref = BaseModelResource(source="embedded").resolve(root, spec)
    assert (ref.family, ref.resolution) == ("sdxl", 64)
    assert set(spec.methods) == {"lora", "dreambooth", "textual_inversion", "controlnet"}
    buckets = bucket_set(ref.resolution, QualityConfig().max_aspect_ratio)
    sizes = [ImageOps.exif_transpose(Image.open(folder / name)).size for name in GOOD_PHOTOS]
    assert len({assign_bucket(w, h, buckets) for w, h in sizes}) >= 3  # square, landscape and portrait photos


def test_embedded_sdxl_build_is_byte_identical_across_builds(sdxl_ref, tmp_path):
    first, second = Path(sdxl_ref.location), ensure_embedded_sdxl_model(tmp_path / "base_models")
    files = {p.relative_to(first).as_posix(): p.read_bytes() for p in sorted(first.rglob("*")) if p.is_file()}
    again = {p.relative_to(second).as_posix(): p.read_bytes() for p in sorted(second.rglob("*")) if p.is_file()}
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(files)
    assert files.keys() == again.keys()
    for name in files:
        assert files[name] == again[name], name
    assert fingerprint_model(first) == fingerprint_model(second)

    index = json.loads(files["model_index.json"])
    assert (index["_class_name"], index["force_zeros_for_empty_prompt"]) == ("StableDiffusionXLPipeline", True)
    unet = json.loads(files["unet/config.json"])
    assert (unet["addition_embed_type"], unet["cross_attention_dim"]) == ("text_time", 32 + 64)
    assert json.loads(files["scheduler/scheduler_config.json"])["_class_name"] == "EulerDiscreteScheduler"


def test_embedded_sdxl_loads_and_generates_in_stock_diffusers(sdxl_ref, tmp_path):
    """In a fresh interpreter that imports only diffusers: what a user of the published folder would do."""
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained({sdxl_ref.location!r}, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a photo of sks dog", num_inference_steps=2, height={EMBEDDED_SDXL_RESOLUTION},
                   width={EMBEDDED_SDXL_RESOLUTION}, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert out.shape == (1, {EMBEDDED_SDXL_RESOLUTION}, {EMBEDDED_SDXL_RESOLUTION}, 3), out.shape
        assert bool((out >= 0).all() and (out <= 1).all()) and out.std() > 0
        assert pipe.tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
        assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id == 0
        assert not any(m.startswith("assets_pipeline") for m in sys.modules)
        print("ok", type(pipe).__name__)
    """)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok StableDiffusionXLPipeline")


def test_loading_by_family(root, sdxl_ref):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd1 = resolve_base_model("embedded", root)
    assert type(load_pipeline(sd1)) is StableDiffusionPipeline
    assert type(load_pipeline(sdxl_ref)) is StableDiffusionXLPipeline
    assert len(load_tokenizers(sd1)) == 1
    tokenizers = load_tokenizers(sdxl_ref)
    assert [t.pad_token for t in tokenizers] == ["<|endoftext|>", "!"]
    assert load_tokenizer(sdxl_ref).pad_token == "<|endoftext|>"  # the first, as before families


def test_sdxl_prompt_encoding_matches_the_pipeline(sdxl_pipe):
    prompts = ["a photo of sks dog", "a dog"]
    with torch.no_grad():
        ids = tokenize([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2], prompts)
        embeds, pooled = encode_sdxl_prompt([sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2], ids)
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
        encode_sdxl_prompt([sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2], ids[:1])


def test_checkpoint_family_from_keys(embedded_model_dir, sdxl_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import save_file

    from assets_pipeline.families import CheckpointKeys
    from ldm_checkpoint import pipeline_to_ldm_state_dict, sdxl_pipeline_to_sgm_state_dict

    sd1 = pipeline_to_ldm_state_dict(StableDiffusionPipeline.from_pretrained(embedded_model_dir,
                                                                             local_files_only=True))
    torch.save({"state_dict": sd1}, tmp_path / "sd1.ckpt")  # a pickled, Lightning-style checkpoint
    assert detect_checkpoint_family(tmp_path / "sd1.ckpt").name == "sd1"

    save_file(sdxl_pipeline_to_sgm_state_dict(sdxl_pipe), str(tmp_path / "xl.safetensors"))
    # diffusers' own marker for SDXL is the 10th block of OpenCLIP-G, which a 2-layer encoder lacks: it says
    # "v1", and the SGM layout's prefix is what names the family.
    assert infer_diffusers_model_type(CheckpointKeys.read(tmp_path / "xl.safetensors")) == "v1"
    assert detect_checkpoint_family(tmp_path / "xl.safetensors").name == "sdxl"

    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, str(tmp_path / "unet-only.safetensors"))
    with pytest.raises(ValueError, match="unet-only.safetensors: no text encoder keys"):
        detect_checkpoint_family(tmp_path / "unet-only.safetensors")


def test_sdxl_single_file_round_trip(sdxl_ref, sdxl_pipe, embedded_model_dir, tmp_path):
    """An SGM-layout .safetensors loads as StableDiffusionXLPipeline with the configs from the tiny folder.

    Every weight of the checkpoint is shifted from the folder's, so equal weights after loading show they came
    from the file (diffusers falls back to a config folder's own weights when it finds no component in a file).
    """
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from ldm_checkpoint import sdxl_pipeline_to_sgm_state_dict

    components = ("unet", "vae", "text_encoder", "text_encoder_2")
    original = {n: {k: v.clone() for k, v in getattr(sdxl_pipe, n).state_dict().items()} for n in components}
    with torch.no_grad():
        for n in components:
            for p in getattr(sdxl_pipe, n).parameters():
                p.add_(0.25)
    try:
        ckpt = tmp_path / "tiny-sdxl.safetensors"
        save_file(sdxl_pipeline_to_sgm_state_dict(sdxl_pipe), str(ckpt))
        ref = resolve_base_model(str(ckpt), tmp_path / "art", single_file_config=sdxl_ref.location)
        assert (ref.kind, ref.family, ref.prediction_type, ref.resolution) == ("single_file", "sdxl", "epsilon", 1024)

        pipe = load_pipeline(ref)
        assert type(pipe) is StableDiffusionXLPipeline
        for n in components:
            assert same_weights(getattr(pipe, n), getattr(sdxl_pipe, n)), n
            loaded = getattr(pipe, n).state_dict()
            assert any(not torch.equal(loaded[k], original[n][k]) for k in loaded), n  # not the folder's
        # The U-Net's output on a fixed input, through the text_time path (pooled text + add_time_ids).
        torch.manual_seed(0)
        sample, hidden = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 96)
        cond = {"text_embeds": torch.randn(1, 32), "time_ids": sdxl_add_time_ids((64, 64), (0, 0), (64, 64))}
        with torch.no_grad():
            out = pipe.unet(sample, 10, hidden, added_cond_kwargs=cond).sample
            expected = sdxl_pipe.unet(sample, 10, hidden, added_cond_kwargs=cond).sample
        # Same weights, yet not bit-identical: float32 sums in another order (activations reach ~400 here).
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
        assert [t.pad_token for t in load_tokenizers(ref)] == ["<|endoftext|>", "!"]

        # Without a config folder the family still comes from the keys (loading would then need the hub).
        bare = resolve_base_model(str(ckpt), tmp_path / "art")
        assert (bare.family, bare.prediction_type, bare.single_file_config) == ("sdxl", "epsilon", None)
        with pytest.raises(ValueError, match="is an sdxl model but its config folder .* is sd1"):
            resolve_base_model(str(ckpt), tmp_path / "art", single_file_config=str(embedded_model_dir))
    finally:
        with torch.no_grad():
            for n in components:
                getattr(sdxl_pipe, n).load_state_dict(original[n])
