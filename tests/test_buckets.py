"""Aspect-ratio buckets: the bucket set, assignment and crop (stages/buckets.py), how batches are drawn from them
(training/data.py), the loss over a batch whose parts have different shapes (training/loop.py), and a
mixed-aspect concept built through the real assets and trained in several buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from assets_pipeline.stages.buckets import (
    aspect_error, assign_bucket, bucket_crop, bucket_label, bucket_set, bucket_step, crop_geometry,
    parse_bucket_label,
)
from assets_pipeline.stages.curation import QualityConfig
from assets_pipeline.training.data import TrainingData, seeded_generator
from helpers import encode, photo

RESOLUTIONS = [64, 128, 256, 512, 768, 1024]


# -- the bucket set ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("max_aspect", [1.0, 1.5, 2.0, 3.0, 4.0])
def test_buckets_fit_the_budget_the_grid_and_the_aspect_limit(resolution, max_aspect):
    buckets = bucket_set(resolution, max_aspect)
    step = bucket_step(resolution)
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w * h <= resolution**2, (w, h)
        assert w * h >= resolution**2 / 2, (w, h)  # never a fraction of the resolution
        assert max(w, h) / min(w, h) <= max_aspect + 1e-9, (w, h)
        assert (w, h) == (resolution, resolution) or (w % step == 0 and h % step == 0), (w, h)
        assert (h, w) in buckets  # both orientations
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)  # one bucket per aspect ratio


def test_bucket_sets_at_the_embedded_and_the_sd_resolutions():
    # SD 1.x at 512 px: 64 px steps, kohya's shapes (one per short side).
    assert bucket_set(512, 3.0) == [(256, 768), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448),
                                    (640, 384), (768, 320), (768, 256)]
    # The embedded model at 64 px: 8 px steps give the same shapes, an eighth of the size.
    assert bucket_step(64) == 8 and bucket_step(512) == 64 and bucket_step(256) == 64
    assert bucket_set(64, 3.0) == [(w // 8, h // 8) for w, h in bucket_set(512, 3.0)]
    assert bucket_set(512, 1.0) == [(512, 512)]


@pytest.mark.parametrize(("resolution", "max_aspect", "bound"),
                         [(64, 3.0, 1.2), (512, 3.0, 1.2), (768, 3.0, 1.2), (1024, 3.0, 1.2), (512, 2.0, 1.2),
                          (64, 2.0, 1.2), (256, 3.0, 1.35), (512, 4.0, 1.3)])
def test_every_photo_the_quality_filter_keeps_has_a_bucket_near_its_shape(resolution, max_aspect, bound):
    """The quality filter's aspect limit is the buckets' limit: every aspect ratio it keeps (either orientation)
    is within ``bound`` of its bucket's, i.e. the crop cuts at most 1 - 1/bound of the longer side."""
    buckets = bucket_set(resolution, max_aspect)
    worst = 0.0
    for aspect in np.linspace(1.0, max_aspect, 400):
        for w, h in ((round(1000 * aspect), 1000), (1000, round(1000 * aspect))):
            worst = max(worst, aspect_error(w, h, assign_bucket(w, h, buckets)))
    assert math.exp(worst) <= bound + 1e-9
    # The most elongated bucket is the filter's limit itself whenever the grid allows it.
    if (resolution, max_aspect) in [(64, 3.0), (512, 3.0), (512, 4.0)]:
        assert max(w / h for w, h in buckets) == pytest.approx(max_aspect)
    assert QualityConfig().max_aspect_ratio == 3.0  # what the defaults above stand for


def test_assignment_is_nearest_in_log_space_and_symmetric():
    buckets = bucket_set(512, 3.0)
    assert assign_bucket(4000, 4000, buckets) == (512, 512)
    assert assign_bucket(3000, 2000, buckets) == (640, 384)  # 1.5: log-nearer 1.667 than 1.286
    assert assign_bucket(2000, 3000, buckets) == (384, 640)
    # Between 1 and 576/448 = 1.286 the log-space midpoint is sqrt(1.286) = 1.134 (the linear one would be 1.143).
    assert assign_bucket(1130, 1000, buckets) == (512, 512)
    assert assign_bucket(1138, 1000, buckets) == (576, 448)
    assert assign_bucket(9000, 1000, buckets) == (768, 256)  # beyond the limit: the most elongated
    for w, h in [(640, 480), (1920, 1080), (1000, 2500), (333, 777)]:
        assert assign_bucket(w, h, buckets) == assign_bucket(h, w, buckets)[::-1]
    with pytest.raises(ValueError, match="positive size"):
        assign_bucket(0, 10, buckets)
    with pytest.raises(ValueError, match="resolution"):
        bucket_set(60, 3.0)
    assert parse_bucket_label(bucket_label((640, 384))) == (640, 384)
    with pytest.raises(ValueError, match="bucket label"):
        parse_bucket_label("640-384")


# -- the crop ---------------------------------------------------------------------------------------------------

def _training_crop_before_buckets(img, resolution, center_crop):
    """The square training crop as it was written before buckets (what the cached latents were made with)."""
    img = img.convert("RGB")
    scale = resolution / min(img.size)
    w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = ((w - resolution) // 2, (h - resolution) // 2) if center_crop else (0, 0)
    return img.crop((left, top, left + resolution, top + resolution))


@pytest.mark.parametrize("size", [(150, 100), (61, 93), (64, 64), (500, 77)])
@pytest.mark.parametrize("center_crop", [True, False])
def test_the_square_bucket_is_the_square_training_crop_pixel_for_pixel(size, center_crop):
    img = photo("coffee", size)
    crop, _ = bucket_crop(img, (64, 64), center_crop)
    assert np.array_equal(np.asarray(crop), np.asarray(_training_crop_before_buckets(img, 64, center_crop)))


def test_crop_covers_the_bucket_and_records_its_offsets():
    # A 96x64 photo in the 80x48 bucket: scaled by 80/96 to 80x53, 5 rows too many: center crop from row 2.
    assert crop_geometry((96, 64), (80, 48), True) == (80, 53, 2, 0)
    assert crop_geometry((96, 64), (80, 48), False) == (80, 53, 0, 0)
    # A 60x100 photo in the 48x80 bucket (aspect 0.6 both): no crop at all.
    assert crop_geometry((60, 100), (48, 80), True) == (48, 80, 0, 0)
    # Too wide for the bucket: the sides are cut, the offset is a column.
    assert crop_geometry((300, 100), (80, 48), True) == (144, 48, 0, 32)

    # The pixels: a white column at x = 150..159 of a 300x100 photo lands at (150 * 0.48 - 32) in the crop.
    px = np.zeros((100, 300, 3), np.uint8)
    px[:, 150:160] = 255
    crop, (top, left) = bucket_crop(Image.fromarray(px), (80, 48), True)
    assert crop.size == (80, 48) and (top, left) == (0, 32)
    cols = np.nonzero(np.asarray(crop.convert("L"))[24] > 128)[0]
    assert abs(cols.min() - (150 * 0.48 - 32)) <= 1 and abs(cols.max() - (160 * 0.48 - 32)) <= 1


# -- batches ----------------------------------------------------------------------------------------------------

SIZES = [(48, 80), (64, 64), (80, 48)]


def synthetic(row_buckets: list[int], roles: list[str] | None = None, std: float = 1.0) -> TrainingData:
    """TrainingData over ``row_buckets`` (bucket ids into SIZES, per row): latents [4, h/8, w/8] whose values
    name their row (row i is all i), embeddings likewise."""
    roles = roles or ["instance"] * len(row_buckets)
    mean, stds = [], []
    for b, (w, h) in enumerate(SIZES):
        rows = [i for i, rb in enumerate(row_buckets) if rb == b]
        mean.append(torch.tensor(rows, dtype=torch.float32)[:, None, None, None].expand(-1, 4, h // 8, w // 8).clone())
        stds.append(torch.full_like(mean[-1], std))
    embeds = torch.arange(len(row_buckets), dtype=torch.float32)[:, None, None].expand(-1, 77, 8).clone()
    return TrainingData(SIZES, mean, stds, row_buckets, embeds, roles, ["c"] * len(roles))


MIXED = [0, 1, 2, 2, 0, 2, 2, 1, 2]  # 2 portrait, 2 square, 5 landscape rows, interleaved


def draw_rows(data, start: int, stop: int, micro: int, group: int, seed: int = 0, roles=("instance",)):
    return [data.indices(roles, micro, s, seed, group) for s in range(start, stop, micro)]


@pytest.mark.parametrize(("micro", "group"), [(1, 1), (2, 4), (4, 4), (3, 3)])
def test_every_batch_is_one_bucket_and_an_epoch_covers_every_row(micro, group):
    data = synthetic(MIXED)
    epoch = sum(-(-n // group) * group for n in (2, 2, 5))  # each bucket's last group filled up
    batches = draw_rows(data, 0, 3 * epoch, micro, group)
    for rows in batches:
        assert len({MIXED[r] for r in rows}) == 1, rows
    for g in range(0, len(batches), group // micro):  # the micro-batches of one group: one bucket
        assert len({MIXED[r] for rows in batches[g : g + group // micro] for r in rows}) == 1
    for e in range(3):
        seen = [r for rows in batches[e * epoch // micro : (e + 1) * epoch // micro] for r in rows]
        assert sorted(set(seen)) == list(range(len(MIXED)))
        assert len(seen) == epoch
    # Epochs are shuffled differently.
    assert batches[: epoch // micro] != batches[epoch // micro : 2 * epoch // micro]


def test_batches_are_a_pure_function_of_seed_and_step_so_a_resume_sees_the_same_rows():
    full = draw_rows(synthetic(MIXED), 0, 120, 2, 4)
    resumed = draw_rows(synthetic(MIXED), 52, 120, 2, 4)  # a fresh process resuming at sample 52
    assert resumed == full[26:]
    backwards = synthetic(MIXED)
    assert [backwards.indices(("instance",), 2, s, 0, 4) for s in range(118, -1, -2)][::-1] == full
    assert draw_rows(synthetic(MIXED), 0, 120, 2, 4, seed=1) != full
    # Several buckets are used, in an order mixed through the epoch.
    assert len({MIXED[rows[0]] for rows in full[:8]}) == 3


def test_a_role_in_one_bucket_draws_exactly_as_before_buckets():
    """buckets = false (or class images): the seeded permutation per epoch, batches spanning epochs, no fill."""
    data = synthetic([1] * 5)
    got = [r for rows in draw_rows(data, 0, 24, 4, 8) for r in rows]
    perms = [torch.randperm(5, generator=seeded_generator("order", 0, "instance", e)).tolist() for e in range(5)]
    assert got == [r for p in perms for r in p][:24]


def test_instance_and_class_parts_of_other_shapes_are_drawn_as_two_parts():
    data = synthetic([2, 2, 1, 1], roles=["instance", "instance", "class", "class"], std=0.0)
    rows = data.indices(("instance", "class"), 2, 0, 0, 2)
    assert [data.roles[r] for r in rows] == ["instance", "instance", "class", "class"]
    parts = data.draw(rows, torch.Generator().manual_seed(0), 0.5, False)
    assert [tuple(p.latents.shape) for p in parts] == [(2, 4, 6, 10), (2, 4, 8, 8)]
    for part, part_rows in zip(parts, (rows[:2], rows[2:])):
        # std 0: the latent is the mean (its row id) times the scaling factor, gathered from the right bucket.
        assert part.latents[:, 0, 0, 0].tolist() == [0.5 * r for r in part_rows]
        assert part.prompt_embeds[:, 0, 0].tolist() == part_rows
    assert [p.is_class.tolist() for p in parts] == [[False, False], [True, True]]
    # Same bucket: one part, one forward, as before buckets.
    same = synthetic([1, 1, 1, 1], roles=["instance", "instance", "class", "class"])
    parts = same.draw(same.indices(("instance", "class"), 2, 0, 0, 2), torch.Generator().manual_seed(0), 1.0, False)
    assert len(parts) == 1 and parts[0].is_class.tolist() == [False, False, True, True]


def test_the_probe_batch_is_the_largest_bucket_and_crossing_a_group_is_refused():
    data = synthetic([0, 0, 2, 1])  # the square (64x64) is the largest area
    assert data.largest_indices(("instance",), 3) == [3, 3, 3]
    assert data.shapes == ((4, 10, 6), (4, 8, 8), (4, 6, 10))
    with pytest.raises(ValueError, match="cross a bucket group"):
        data.indices(("instance",), 3, 0, 0, 4)
    with pytest.raises(ValueError, match="cross a bucket group"):
        data.indices(("instance",), 2, 3, 0, 4)


def test_a_batch_of_two_shapes_weighs_the_prior_loss_as_one_forward_would(embedded_model_dir):
    """DreamBooth with instance rows in one bucket and class rows in another: two forwards, and the loss is
    instance mean + prior_loss_weight x class mean, each part drawing its noise in turn from the generator."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from assets_pipeline.models.families import get_family
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import Batch, Models
    from assets_pipeline.training.step import compute_loss

    torch.manual_seed(0)
    models = Models(family=get_family("sd1"),
                    denoiser=UNet2DConditionModel.from_pretrained(embedded_model_dir, subfolder="unet"),
                    noise_scheduler=DDPMScheduler.from_pretrained(embedded_model_dir, subfolder="scheduler"))
    instance = Batch(latents=torch.randn(2, 4, 24, 40), prompt_embeds=torch.randn(2, 77, 32),
                     is_class=torch.tensor([False, False]))
    prior = Batch(latents=torch.randn(2, 4, 32, 32), prompt_embeds=torch.randn(2, 77, 32),
                  is_class=torch.tensor([True, True]))
    dreambooth, lora = get_method("dreambooth"), get_method("lora")
    cfg = dreambooth.config_cls(prior_loss_weight=0.5)
    with torch.no_grad():
        both = compute_loss(dreambooth, models, [instance, prior], cfg, torch.Generator().manual_seed(3), torch.float32)
        g = torch.Generator().manual_seed(3)
        alone = [compute_loss(lora, models, [part], lora.config_cls(), g, torch.float32) for part in (instance, prior)]
    assert both.item() == pytest.approx(alone[0].item() + 0.5 * alone[1].item(), rel=1e-5)
    assert torch.isfinite(both)


# -- a mixed-aspect concept through the assets ------------------------------------------------------------------

def shaped(name: str, size: tuple[int, int]) -> Image.Image:
    """A real photo cut to ``size``'s aspect ratio at its center, then scaled to ``size`` (not squashed)."""
    img = photo(name)
    w, h = size
    scale = max(w / img.width, h / img.height)
    img = img.resize((math.ceil(img.width * scale), math.ceil(img.height * scale)), Image.Resampling.LANCZOS)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h))


# At the embedded model's 64 px: portrait 0.6 -> 48x80, landscape 1.67 -> 80x48, square -> 64x64, wide 2.4 -> 96x40.
MIXED_PHOTOS = {"astronaut": (128, 128), "coffee": (160, 96), "chelsea": (150, 90), "rocket": (96, 160),
                "immunohistochemistry": (90, 150), "hubble_deep_field": (192, 80)}
EXPECTED_BUCKETS = {"astronaut": (64, 64), "coffee": (80, 48), "chelsea": (80, 48), "rocket": (48, 80),
                    "immunohistochemistry": (48, 80), "hubble_deep_field": (96, 40)}


@pytest.fixture(scope="module")
def mixed_concept(tmp_path_factory, built_models):
    """A concept of portrait, landscape, square and wide photos, its dataset half built through Dagster."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, default_resources
    from assets_pipeline.resources import PipelineStorage
    from helpers import write_concept
    from tests.conftest import link_models

    root = tmp_path_factory.mktemp("buckets")
    files = {f"{name}.png": encode(shaped(name, size), "PNG") for name, size in MIXED_PHOTOS.items()}
    spec = 'token = "sks"\nclass_noun = "scene"\nmethods = ["lora", "controlnet"]\n'
    write_concept(root / "data", "mixed", files, spec)
    storage = PipelineStorage(data_root=str(root / "data"), artifact_root=str(link_models(built_models, root / "art")))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["mixed"])
        res = dg.materialize(ASSETS, selection="group:dataset or group:priors or group:latents", partition_key="mixed",
                             instance=instance, resources={**default_resources(), "storage": storage})
    assert res.success
    mats = {e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for e in res.get_asset_materialization_events()}
    return storage, mats


def test_a_mixed_aspect_concept_gets_its_buckets_and_aligned_control_images(mixed_concept):
    from assets_pipeline.assets.common import read_upstream

    storage, mats = mixed_concept
    index = read_upstream(storage, "mixed", "vae_latents", "index.parquet")
    scores = read_upstream(storage, "mixed", "clip_scored_images", "scores.parquet")
    name = {r.image_sha256: r.source_path.split("/")[-1].removesuffix(".png") for r in scores.itertuples()}
    got = {name[r.image_sha256]: (r.bucket_width, r.bucket_height) for r in index.itertuples()}
    assert got == EXPECTED_BUCKETS  # every photo kept, each in the bucket of its shape
    assert {name[r.image_sha256]: (r.original_width, r.original_height) for r in index.itertuples()} == MIXED_PHOTOS
    assert mats["vae_latents"]["bucket_count"].value == 4
    assert "48x80" in mats["vae_latents"]["buckets"].value and "96x40" in mats["vae_latents"]["buckets"].value

    control = read_upstream(storage, "mixed", "control_images", "control.parquet")
    assert mats["control_images"]["bucket_count"].value == 4
    for r in control.itertuples():
        assert (r.bucket_width, r.bucket_height) == got[name[r.image_sha256]]
        with Image.open(r.control_path) as img:
            assert img.size == got[name[r.image_sha256]]


def _job(storage, method: str, tmp_path, **overrides):
    import dataclasses

    from assets_pipeline.assets.common import spec_from_snapshot
    from helpers import plan_for
    from assets_pipeline.resources import BaseModelResource, ClipScorerResource, TrainerLauncher

    ref = BaseModelResource().resolve(storage.artifact_path())
    job = plan_for(storage, ref, spec_from_snapshot(storage, "mixed"), method, run_id="buckets",
                          input_versions={}, trainer=TrainerLauncher(device="cpu"), clip_scorer=ClipScorerResource(),
                          overrides={"checkpointing_steps": 1000, **overrides})
    return dataclasses.replace(job, output_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ckpt"),
                               cache_dir=str(tmp_path / "cache")), ref


def test_a_mixed_aspect_concept_trains_in_several_buckets_and_loads_in_stock_diffusers(mixed_concept, tmp_path,
                                                                                       monkeypatch):
    from diffusers import StableDiffusionPipeline

    from assets_pipeline.training.loop import train

    job, ref = _job(mixed_concept[0], "lora", tmp_path, max_train_steps=4)
    shapes = []
    draw = TrainingData.draw

    def recording_draw(self, *args, **kwargs):
        parts = draw(self, *args, **kwargs)
        shapes.append([tuple(p.latents.shape) for p in parts])
        return parts

    monkeypatch.setattr(TrainingData, "draw", recording_draw)
    state = train(job)
    assert len(state.losses) == 4 and all(math.isfinite(v) for v in state.losses)
    assert all(len(parts) == 1 for parts in shapes)  # LoRA has one role: one bucket, one forward per batch
    assert len({parts[0] for parts in shapes}) >= 2, shapes  # trained in several buckets

    out = tmp_path / "weights"
    out.mkdir()
    state.method.save(state.models, None, out, state.cfg, state.ctx)
    images = []
    for lora in (True, False):  # stock diffusers, nothing from this project
        pipe = StableDiffusionPipeline.from_pretrained(ref.location, local_files_only=True)
        if lora:
            pipe.load_lora_weights(out)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe("a photo of sks scene", num_inference_steps=1, width=80, height=48, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images[0])
    assert images[0].shape == images[1].shape == (48, 80, 3)  # a landscape bucket's shape renders
    assert np.abs(images[0] - images[1]).max() > 0, "the trained LoRA leaves the image unchanged"


def test_controlnet_pairs_each_latent_with_the_conditioning_image_of_its_bucket(mixed_concept, tmp_path):
    from pathlib import Path

    job, _ = _job(mixed_concept[0], "controlnet", tmp_path)
    data = TrainingData.from_bundle(Path(job.latents_dir), job.training_images, lambda c: c, control=True)
    assert sorted(data.sizes) == sorted(set(EXPECTED_BUCKETS.values()))
    for k, (w, h) in enumerate(data.sizes):  # the tiny VAE downsamples 2x
        n = data.row_bucket.count(k)
        assert data.mean[k].shape == (n, 4, h // 2, w // 2) and data.control[k].shape == (n, 3, h, w)
    row = next(i for i, b in enumerate(data.row_bucket) if data.sizes[b] == (96, 40))
    with Image.open(job.training_images[row].control_path) as img:
        expected = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(data.control[data.row_bucket[row]][data.position[row]], expected)
    (part,) = data.draw([row], torch.Generator().manual_seed(0), 1.0, False)
    assert part.latents.shape == (1, 4, 20, 48) and part.control.shape == (1, 3, 40, 96)
