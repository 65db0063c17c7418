"""Class images: content-addressed, reused across concepts with the same class noun and base model."""

from __future__ import annotations

import re

import pytest

from assets_pipeline.stages import class_images as ci
from assets_pipeline.stages.class_images import ClassImageConfig, class_image_keys, generate_class_images
from assets_pipeline.store import ItemCache

PROMPT = "a photo of a dog"


def test_keys_cover_everything_that_determines_the_image():
    cfg = ClassImageConfig()
    base = class_image_keys("fp", PROMPT, 3, 64, cfg, quick=True)
    assert len({k for _, k in base}) == 3
    variants = [
        class_image_keys("other-model", PROMPT, 3, 64, cfg, quick=True),
        class_image_keys("fp", "a photo of a cat", 3, 64, cfg, quick=True),
        class_image_keys("fp", PROMPT, 3, 128, cfg, quick=True),
        class_image_keys("fp", PROMPT, 3, 64, ClassImageConfig(guidance_scale=5.0), quick=True),
        class_image_keys("fp", PROMPT, 3, 64, ClassImageConfig(num_inference_steps=20), quick=True),
        class_image_keys("fp", PROMPT, 3, 64, ClassImageConfig(scheduler="DDIMScheduler"), quick=True),
        class_image_keys("fp", PROMPT, 3, 64, ClassImageConfig(seed=7), quick=True),
        class_image_keys("fp", PROMPT, 3, 64, ClassImageConfig(dtype="bfloat16"), quick=True),
        class_image_keys("fp", PROMPT, 3, 64, cfg, quick=False),  # DPM-Solver++ at 25 steps
    ]
    for v in variants:
        assert not {k for _, k in v} & {k for _, k in base}
    # raising the count keeps the first keys: only the new ones are generated
    assert class_image_keys("fp", PROMPT, 5, 64, cfg, quick=True)[:3] == base
    # batch size and compilation pick kernels, not the sample: same keys
    assert class_image_keys("fp", PROMPT, 3, 64, ClassImageConfig(batch_size=1, compile=True), quick=True) == base
    # guidance 7 and 7.0 are the same setting
    assert class_image_keys("fp", PROMPT, 3, 64, ClassImageConfig(guidance_scale=7), quick=True) == \
        class_image_keys("fp", PROMPT, 3, 64, ClassImageConfig(guidance_scale=7.0), quick=True)


def test_auto_dtype_is_bf16_on_cuda_only_and_enters_the_key(monkeypatch):
    monkeypatch.setattr(ci, "_cuda_bf16_supported", lambda: True)
    cfg = ClassImageConfig()
    assert cfg.sampling("cpu", quick=False).dtype == "float32"
    assert cfg.sampling("cuda:0", quick=False).dtype == "bfloat16"
    cuda = class_image_keys("fp", PROMPT, 2, 64, cfg, quick=False, device="cuda")
    assert cuda == class_image_keys("fp", PROMPT, 2, 64, ClassImageConfig(dtype="bfloat16"), quick=False)
    assert not set(cuda) & set(class_image_keys("fp", PROMPT, 2, 64, cfg, quick=False, device="cpu"))
    monkeypatch.setattr(ci, "_cuda_bf16_supported", lambda: False)  # e.g. a T4 or V100
    assert cfg.sampling("cuda", quick=False).dtype == "float32"


@pytest.mark.parametrize("device, quick, expected", [
    ("cpu", False, ("DPMSolverMultistepScheduler", 25, 4)),
    ("cuda", False, ("DPMSolverMultistepScheduler", 25, 16)),
    ("cpu", True, ("model", 10, 4)),  # the embedded random model keeps its cheap settings
])
def test_defaults_per_device_and_model(device, quick, expected):
    cfg = ClassImageConfig()
    s = cfg.sampling(device, quick)
    assert (s.scheduler, s.steps, cfg.resolved_batch_size(device)) == expected
    # 'model' reproduces train_dreambooth.py: the model's scheduler at diffusers' 50 steps
    assert ClassImageConfig(scheduler="model").sampling(device, quick=False).steps == 50


def test_compile_auto_only_on_cuda_with_many_images():
    cfg = ClassImageConfig()
    assert not cfg.resolved_compile("cpu", 10**6)
    assert not cfg.resolved_compile("cuda", ci.COMPILE_MIN_IMAGES - 1)
    assert cfg.resolved_compile("cuda:0", ci.COMPILE_MIN_IMAGES)
    assert ClassImageConfig(compile=True).resolved_compile("cpu", 1)
    assert not ClassImageConfig(compile=False).resolved_compile("cuda", 10**6)


@pytest.mark.parametrize("key, value", [
    ("batch_size", 0), ("batch_size", "big"), ("batch_size", True), ("dtype", "fp16"), ("compile", "yes"),
    ("num_inference_steps", 0), ("guidance_scale", -1.0), ("scheduler", "dpm++"), ("seed", -1),
])
def test_invalid_values_fail_naming_key_and_value(key, value):
    with pytest.raises(ValueError, match=re.escape(f"[class_images] {key} = {value!r} is invalid: expected")):
        ClassImageConfig(**{key: value})


def test_unknown_scheduler_class_fails_when_loading():
    class Pipe:
        scheduler = None

    with pytest.raises(ValueError, match="scheduler = 'NoSuchScheduler' is invalid"):
        ci.set_scheduler(Pipe(), "NoSuchScheduler")


@pytest.fixture(scope="module")
def tiny_pipeline():
    from assets_pipeline.models.embedded import build_pipeline

    return build_pipeline("tiny")


def _generate(tmp_path, pipe, cfg, quick=True, count=3):
    loaded = []

    def load(dtype):
        loaded.append(dtype)
        return pipe

    cache = ItemCache(tmp_path, "class_images", ".png")
    df = generate_class_images(load, "fp", PROMPT, count, 64, cfg, cache, quick=quick)
    return df, loaded, cache


def test_images_do_not_depend_on_batch_size(tmp_path, tiny_pipeline):
    import numpy as np
    from PIL import Image

    one, _, _ = _generate(tmp_path / "b1", tiny_pipeline, ClassImageConfig(num_inference_steps=2, batch_size=1))
    three, _, _ = _generate(tmp_path / "b3", tiny_pipeline, ClassImageConfig(num_inference_steps=2, batch_size=3))

    def pixels(df):
        return [np.asarray(Image.open(p), dtype=np.int16) for p in df["decoded_path"]]

    for a, b in zip(pixels(one), pixels(three)):
        # Same noise, same sample. Not always the same bytes: MKL's sgemm rounds differently for another number
        # of rows (time embedding: 2 rows at batch 1, 6 at batch 3), which can move a pixel by one level.
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3
    a0, a1, a2 = pixels(one)
    assert np.abs(a0 - a1).mean() > 10 and np.abs(a1 - a2).mean() > 10  # seed + i: three different images


def test_real_model_defaults_use_dpm_solver_pp_in_fp32_on_cpu(tmp_path, tiny_pipeline):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_pipeline.components)  # its own scheduler slot: the fixture keeps PNDM
    df, loaded, cache = _generate(tmp_path, pipe, ClassImageConfig(num_inference_steps=2), quick=False, count=2)
    assert loaded == [torch.float32]
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # built from the model's config
    assert cache.counts() == {"items_computed": 2, "items_cached": 0}
    again, loaded_again, _ = _generate(tmp_path, pipe, ClassImageConfig(num_inference_steps=2), quick=False, count=2)
    assert loaded_again == [] and list(again["image_sha256"]) == list(df["image_sha256"])


def test_compiled_runs_pad_the_last_batch_to_one_shape(tmp_path):
    from PIL import Image

    calls = []

    class Unet:
        compiled = False

        def compile(self):
            self.compiled = True

    class Pipe:
        scheduler = None
        unet = Unet()

        def to(self, device):
            return self

        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, prompts, generator, **kw):
            calls.append(len(generator))
            return type("Out", (), {"images": [Image.new("RGB", (8, 8), (g.initial_seed() % 256, 0, 0))
                                               for g in generator]})

    cfg = ClassImageConfig(scheduler="model", batch_size=4, compile=True)
    progress = []
    cache = ItemCache(tmp_path, "class_images", ".png")
    df = generate_class_images(lambda dtype: Pipe(), "fp", PROMPT, 6, 64, cfg, cache, quick=True,
                               progress=lambda done, total: progress.append((done, total)))
    assert Pipe.unet.compiled and calls == [4, 4]
    assert progress == [(4, 6), (6, 6)]
    assert cache.counts()["items_computed"] == 6 and len(df) == 6  # padding images are dropped


@pytest.mark.gpu
def test_gpu_defaults_generate_in_bf16_and_fp32_matches_the_cpu(tmp_path, tiny_pipeline):
    """The device is not in the key: fp32 on CUDA must give the CPU's fp32 images up to kernel rounding."""
    import copy

    import numpy as np
    import torch
    from PIL import Image

    def run(name, cfg, device):
        pipe = copy.deepcopy(tiny_pipeline)
        loaded = []

        def load(dtype):
            loaded.append(dtype)
            return pipe.to(dtype)

        cache = ItemCache(tmp_path / name, "class_images", ".png")
        df = generate_class_images(load, "fp", PROMPT, 3, 64, cfg, cache, quick=False, device=device)
        return [np.asarray(Image.open(p), dtype=np.int16) for p in df["decoded_path"]], loaded, pipe

    images, loaded, pipe = run("bf16", ClassImageConfig(num_inference_steps=4), "cuda")
    assert loaded == [torch.bfloat16] and pipe.unet.device.type == "cuda"
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    fp32_gpu, _, _ = run("gpu", ClassImageConfig(num_inference_steps=4, dtype="float32"), "cuda")
    fp32_cpu, _, _ = run("cpu", ClassImageConfig(num_inference_steps=4, dtype="float32"), "cpu")
    for g, c, b in zip(fp32_gpu, fp32_cpu, images):
        # H100, torch 2.11: fp32 GPU vs CPU max 1 level, mean 0.04; bf16 vs fp32 mean ~46 levels (hence in the key)
        assert np.abs(g - c).max() <= 2 and np.abs(g - c).mean() < 0.5
        assert np.abs(b - c).mean() > 5


@pytest.mark.slow
def test_second_concept_with_same_class_reuses_images_and_more_only_adds(tmp_path, storage, data_root):
    import shutil

    import dagster as dg

    from assets_pipeline.definitions import ASSETS, default_resources
    from assets_pipeline.demo_data import write_demo_concept

    demo = write_demo_concept(data_root, "source")
    spec = ('token = "{t}"\nclass_noun = "dog"\nmethods = ["dreambooth"]\n'
            '[dreambooth]\nnum_class_images = {n}\n[class_images]\nnum_inference_steps = 2\n')
    for name, token in (("rex", "sks"), ("fido", "zwx")):
        folder = data_root / name
        folder.mkdir()
        shutil.copy(demo / "astronaut.png", folder / "a.png")
        (folder / "concept.toml").write_text(spec.format(t=token, n=3))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("concepts", ["rex", "fido"])
    resources = {**default_resources(), "storage": storage}

    def build(concept):
        res = dg.materialize(ASSETS, selection=["raw_images", "class_images"], partition_key=concept,
                             instance=instance, resources=resources)
        mat = [e.materialization for e in res.get_asset_materialization_events()
               if e.materialization.asset_key.to_user_string() == "class_images"][0]
        return mat.metadata["items_computed"].value, mat.metadata["items_cached"].value, mat

    assert build("rex")[:2] == (3, 0)
    computed, cached, mat = build("fido")
    assert (computed, cached) == (0, 3)
    assert mat.metadata["dagster/row_count"].value == 3
    (data_root / "fido" / "concept.toml").write_text(spec.format(t="zwx", n=5))
    assert build("fido")[:2] == (2, 3)
