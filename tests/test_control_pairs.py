"""ControlNet conditioning images users bring (issue 29, point 1): ``<concept>/control/<photo name>.<ext>``,
never ingested as photos, each pair checked at ingest (a reject with its reason per fault), given its photo's bucket
and crop, a blocking check naming each subset photo without a valid pair, and ControlNet trained on the pairs."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from assets_pipeline.stages.conditioning import ControlConfig, control_key, pair_control_images
from assets_pipeline.stages.ingest import PairRules, ingest_concept
from assets_pipeline.store import ItemCache
from helpers import encode, photo, write_concept

PHOTOS = {"a": "astronaut", "b": "chelsea", "c": "coffee", "d": "rocket", "e": "hubble_deep_field"}


def png(img: Image.Image) -> bytes:
    return encode(img, "PNG")


def edges(img: Image.Image) -> Image.Image:
    """A stand-in for a user's conditioning image: another picture of the same geometry (the photo inverted)."""
    return ImageOps.invert(img.convert("RGB"))


def folder_with_pairs(data_root, name="c1", spec=None, files=None):
    imgs = {k: photo(v, (96, 64)) for k, v in PHOTOS.items()}
    content = {f"{k}.png": png(img) for k, img in imgs.items()}
    content.update(files if files is not None else {
        "control/a.png": png(edges(imgs["a"]).resize((48, 32))),  # half size, same aspect: valid
        "control/b.png": png(edges(imgs["b"])), "control/b.jpg": encode(edges(imgs["b"]), "JPEG"),  # two for b
        "control/zzz.png": png(edges(imgs["c"])),  # no photo zzz
        "control/c.png": content["c.png"],  # the photo itself
        "control/d.png": png(edges(imgs["d"]).resize((64, 64))),  # square pair of a 3:2 photo
        "control/e.png": b"\x89PNG\r\n\x1a\n not a png",  # unreadable
        "control/notes.txt": b"what these are",
    })
    return write_concept(data_root, name, content, spec or 'token = "sks"\nmethods = ["controlnet"]\n'), imgs


def test_control_folder_is_paired_by_name_and_every_fault_is_a_reject_with_its_reason(tmp_path):
    folder, _ = folder_with_pairs(tmp_path)
    res = ingest_concept(folder, tmp_path, ItemCache(tmp_path / "art", "images", ".png"))
    # the conditioning images are never photos (they were, before: 13 of 14 edge maps entered the subset)
    assert sorted(res.manifest["source_path"]) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert list(res.pairs["control_source_path"]) == ["control/a.png"]
    pair = res.pairs.iloc[0]
    assert pair["source_path"] == "a.png" and (pair["control_width"], pair["control_height"]) == (48, 32)
    assert pair["image_sha256"] == res.manifest.set_index("source_path").loc["a.png", "image_sha256"]
    codes = dict(zip(res.rejects["source_path"], res.rejects["code"]))
    assert codes == {"control/b.jpg": "control_duplicate", "control/b.png": "control_duplicate",
                     "control/c.png": "control_same_as_photo", "control/d.png": "control_aspect_mismatch",
                     "control/e.png": "control_unreadable", "control/notes.txt": "unsupported_type",
                     "control/zzz.png": "control_without_photo"}
    reasons = dict(zip(res.rejects["source_path"], res.rejects["reason"]))
    assert "2 conditioning images for the photo b.*" in reasons["control/b.png"]
    assert "64x64 (width/height 1.000), its photo d.png 96x64 (1.500)" in reasons["control/d.png"]
    assert "max_aspect_difference = 0.02" in reasons["control/d.png"]
    assert "byte-identical to its photo c.png" in reasons["control/c.png"]
    assert reasons["control/e.png"].startswith("conditioning image of e.png: ")
    assert "no photo zzz.<image extension>" in reasons["control/zzz.png"]
    # a wider tolerance takes the square pair of the 3:2 photo... no: 50% is past any sane tolerance
    loose = ingest_concept(folder, tmp_path, ItemCache(tmp_path / "art", "images", ".png"),
                           pairs=PairRules(max_aspect_difference=0.6))
    assert sorted(loose.pairs["control_source_path"]) == ["control/a.png", "control/d.png"]


def test_with_an_annotator_source_the_folder_is_not_read_and_says_so(tmp_path):
    folder, _ = folder_with_pairs(tmp_path)
    res = ingest_concept(folder, tmp_path, ItemCache(tmp_path / "art", "images", ".png"), pairs=PairRules(use=False))
    assert len(res.pairs) == 0 and len(res.manifest) == 5
    unused = res.rejects[res.rejects["code"] == "control_not_used"]
    assert len(unused) == 7 and "[control] source = 'annotator'" in unused["reason"].iloc[0]


def test_a_pair_is_resized_to_its_photo_and_given_its_bucket_and_crop(tmp_path):
    """Pixel-aligned with the latent: the pair's crop is the crop of the photo's geometry (here the photo inverted,
    so the conditioning crop is the inverted photo crop, up to resampling)."""
    from assets_pipeline.stages.buckets import bucket_crop

    img = photo("astronaut", (150, 100))
    src = tmp_path / "a.png"
    img.save(src)
    pair = tmp_path / "pair.png"
    edges(img).resize((75, 50), Image.Resampling.LANCZOS).resize((150, 100), Image.Resampling.LANCZOS).save(pair)
    subset = pd.DataFrame([{"image_sha256": "1" * 64, "source_path": "a.png", "decoded_path": str(src),
                            "caption": "c"}, {"image_sha256": "2" * 64, "source_path": "b.png",
                                              "decoded_path": str(src), "caption": "c"}])
    pairs = pd.DataFrame([{"image_sha256": "1" * 64, "source_path": "a.png", "control_sha256": "3" * 64,
                           "control_source_path": "control/a.png", "control_width": 150, "control_height": 100,
                           "control_decoded_path": str(pair)}])
    for bucket, center in (((64, 64), True), ((96, 64), True), ((64, 64), False)):
        df, missing = pair_control_images(subset, pairs, [bucket], center, ItemCache(tmp_path, "control", ".png"))
        assert list(df["source_path"]) == ["a.png"] and list(df["control_source_path"]) == ["control/a.png"]
        got = np.asarray(Image.open(df["control_path"].iloc[0]).convert("RGB"), dtype=float)
        want = np.asarray(edges(bucket_crop(img, bucket, center)[0]), dtype=float)
        assert got.shape[:2] == (bucket[1], bucket[0])
        assert np.abs(got - want).mean() < 12, np.abs(got - want).mean()  # aligned (a shifted crop: ~60)
        assert list(missing["source_path"]) == ["b.png"] and "control/b.<image extension>" in missing["reason"][0]


def test_an_annotator_image_names_its_annotator_and_parameters_for_lineage(tmp_path):
    from assets_pipeline.hashing import sha256_file
    from assets_pipeline.stages.conditioning import make_control_images

    src = tmp_path / "a.png"
    photo("coffee", (96, 64)).save(src)
    subset = pd.DataFrame([{"image_sha256": "1" * 64, "source_path": "a.png", "decoded_path": str(src),
                            "caption": "c"}])
    df = make_control_images(subset, ControlConfig(low_threshold=50), [(64, 64)], True,
                             ItemCache(tmp_path, "control", ".png"))
    assert df["control_source"][0] == "annotator annotator=canny low_threshold=50 high_threshold=200"
    assert df["control_sha256"][0] == sha256_file(df["control_path"][0])


def test_an_annotator_image_keeps_the_cache_key_it_had_before_the_folder_settings_existed():
    from assets_pipeline.hashing import digest

    legacy = {"annotator": "canny", "low_threshold": 100, "high_threshold": 200}  # ControlConfig's fields until now
    assert control_key("a" * 64, ControlConfig(require_all_pairs=False), (64, 64), True) == digest(
        "control-image", "a" * 64, 2, legacy, 64, True)


@pytest.mark.parametrize("kwargs", [{"source": "pairs"}, {"max_aspect_difference": 1.5},
                                    {"max_aspect_difference": -0.1}])
def test_control_config_refuses_a_bad_source_or_tolerance(kwargs):
    with pytest.raises(ValueError):
        ControlConfig(**kwargs)


def test_auto_reads_the_folder_only_where_there_is_one(tmp_path):
    assert not ControlConfig().from_folder(tmp_path)
    (tmp_path / "control").mkdir()
    assert ControlConfig().from_folder(tmp_path) and not ControlConfig(source="annotator").from_folder(tmp_path)
    assert ControlConfig(source="folder").from_folder(tmp_path / "elsewhere")


def test_pairs_are_held_out_for_validation_only_where_enough_remain_to_train_on():
    from assets_pipeline.training.methods.controlnet import MIN_TRAINING_PAIRS, ControlNetConfig, held_out

    shas = [f"{i:02x}" * 32 for i in range(MIN_TRAINING_PAIRS + 2)][::-1]
    assert held_out(shas, 2) == sorted(shas)[:2]  # the lowest sha256, whatever the order given
    assert held_out(shas[:-1], 2) == []  # 7 would remain: all train, validation follows training pairs
    assert held_out(shas[:-1], 1) == sorted(shas[:-1])[:1]
    assert held_out(shas, 0) == []
    with pytest.raises(ValueError, match="validation_holdout must be an integer >= 0, got -1"):
        ControlNetConfig(validation_holdout=-1)


# -- through Dagster: ControlNet trained on the concept's own pairs --------------------------------------------------

DATASET = dg.AssetSelection.groups("dataset", "priors", "latents")


@pytest.mark.slow
def test_controlnet_trains_on_the_concepts_own_pairs_and_a_missing_pair_blocks_it(tmp_path, built_models):
    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.resources import PipelineStorage
    from assets_pipeline.training.reuse import current_output
    from conftest import link_models

    data = tmp_path / "data"
    storage = PipelineStorage(data_root=str(data), artifact_root=str(link_models(built_models, tmp_path / "art")))
    imgs = {k: photo(v, (96, 64)) for k, v in PHOTOS.items() if k != "e"}
    folder, _ = folder_with_pairs(data, "own", files={f"control/{k}.png": png(edges(img)) for k, img in imgs.items()})
    (folder / "e.png").unlink()
    resources = {**default_resources(), "storage": storage}
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["own"])

        def build(selection):
            return dg.materialize([*ASSETS, *CHECKS], selection=selection, partition_key="own", instance=instance,
                                  resources=resources, raise_on_error=False)

        res = build(DATASET | dg.AssetSelection.assets("controlnet_model"))
        assert res.success
        checks = {c.check_name: c for c in res.get_asset_check_evaluations()}
        assert checks["control_pairs_valid"].passed
        mats = {e.materialization.asset_key.to_user_string(): e.materialization
                for e in res.get_asset_materialization_events()}
        assert mats["raw_images"].metadata["conditioning_pairs"].value == 4
        assert mats["control_images"].metadata["source"].value == "folder"
        out = current_output(storage.layout(), "own", "controlnet_model")
        manifest = json.loads((out / "lineage.json").read_text())
        assert len(manifest["training_images"]) == 4 and checks["manifest_lists_training_images"].passed
        table = pd.read_parquet(storage.layout().asset_dir("own", "control_images") / "control.parquet")
        assert sorted(table["control_source_path"]) == [f"control/{k}.png" for k in "abcd"]

        # lineage of both halves: each row names its conditioning image's sha256 and file; either file finds it
        from assets_pipeline.hashing import sha256_file
        from assets_pipeline.lineage import audit_output, outputs_trained_on

        rows = {r["source_path"]: r for r in manifest["training_images"]}
        assert rows["a.png"]["control_source"] == "control/a.png"
        assert rows["a.png"]["control_sha256"] == sha256_file(folder / "control" / "a.png")
        found = outputs_trained_on(storage.artifact_path(), sha256_file(folder / "control" / "b.png"))
        assert list(found["output"]) == [str(out)] and list(found["match"]) == ["content: conditioning image"]
        by_path = outputs_trained_on(storage.artifact_path(), None, ("own", "control/c.png"))
        assert list(by_path["output"]) == [str(out)]
        assert set(audit_output(out, data)["control_status"]) == {"unchanged"}
        # what a person sees: each validation render beside the conditioning image it followed (one of the pairs)
        shown = np.asarray(Image.open(out / "validation" / "p0_seed0_conditioning.png").convert("RGB"))
        from assets_pipeline.tables import read_asset_table

        paths = read_asset_table(storage.layout(), "own", "control_images", "control.parquet")["control_path"]
        assert any(np.array_equal(shown, np.asarray(Image.open(c).convert("RGB"))) for c in paths)
        with Image.open(out / "validation" / "grid.png") as grid:  # conditioning, base, trained per seed
            assert grid.width >= 3 * 256

        # a changed pair: only its own conditioning image is made again (the others' cache keys are unchanged)
        (folder / "control" / "a.png").write_bytes(png(edges(imgs["a"]).rotate(180)))
        res = build(DATASET)
        mats = {e.materialization.asset_key.to_user_string(): e.materialization
                for e in res.get_asset_materialization_events()}
        assert (mats["control_images"].metadata["items_computed"].value,
                mats["control_images"].metadata["items_cached"].value) == (1, 3)

        # d's pair gone: the check names d and ControlNet is blocked (not trained, nothing new made current)
        (folder / "control" / "d.png").unlink()
        res = build(DATASET | dg.AssetSelection.assets("controlnet_model"))
        check = next(c for c in res.get_asset_check_evaluations() if c.check_name == "control_pairs_valid")
        assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
        assert "d.png: no valid conditioning image control/d.<image extension>" in check.metadata["without_pair"].value
        assert "controlnet_model" not in {e.materialization.asset_key.to_user_string()
                                          for e in res.get_asset_materialization_events()}
        assert current_output(storage.layout(), "own", "controlnet_model") == out
        audit = audit_output(out, data).set_index("source_path")["control_status"]
        assert (audit["d.png"], audit["a.png"], audit["b.png"]) == ("missing", "changed", "unchanged")

        # require_all_pairs = false: it trains on the three photos that have one
        (folder / "concept.toml").write_text('token = "sks"\nmethods = ["controlnet"]\n'
                                             "[control]\nrequire_all_pairs = false\n")
        res = build(DATASET | dg.AssetSelection.assets("controlnet_model"))
        assert res.success
        check = next(c for c in res.get_asset_check_evaluations() if c.check_name == "control_pairs_valid")
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        trained = current_output(storage.layout(), "own", "controlnet_model")
        assert trained != out
        rows = json.loads((trained / "lineage.json").read_text())["training_images"]
        assert sorted(r["source_path"] for r in rows) == ["a.png", "b.png", "c.png"]


@pytest.mark.slow
def test_controlnet_trains_on_line_art_and_depth_annotators_and_names_them_in_its_lineage(tmp_path, built_models):
    """Issue 29, point 2: each annotator end to end (a tiny random-weight DPT for depth)."""
    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.resources import PipelineStorage
    from assets_pipeline.training.reuse import current_output
    from conftest import link_models
    from helpers import photos, tiny_depth_model

    dpt = tiny_depth_model(tmp_path / "dpt")
    data = tmp_path / "data"
    storage = PipelineStorage(data_root=str(data), artifact_root=str(link_models(built_models, tmp_path / "art")))
    spec = 'token = "sks"\nmethods = ["controlnet"]\n[control]\n'
    write_concept(data, "lines", photos(["astronaut", "chelsea", "coffee", "rocket"]),
                  spec + 'annotator = "lineart"\ngaussian_sigma = 4.0\n')
    write_concept(data, "deep", photos(["astronaut", "chelsea", "coffee", "rocket"]),
                  spec + f'annotator = "depth"\ndepth_model = "{dpt}"\n')
    resources = {**default_resources(), "storage": storage}
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["lines", "deep"])
        for concept, source in (("lines", "annotator annotator=lineart gaussian_sigma=4.0 intensity_threshold=8"),
                                ("deep", f"annotator annotator=depth depth_model={dpt} weights=")):
            res = dg.materialize([*ASSETS, *CHECKS], selection=DATASET | dg.AssetSelection.assets("controlnet_model"),
                                 partition_key=concept, instance=instance, resources=resources)
            assert res.success
            mats = {e.materialization.asset_key.to_user_string(): e.materialization
                    for e in res.get_asset_materialization_events()}
            assert mats["control_images"].metadata["annotator"].value == {"lines": "lineart", "deep": "depth"}[concept]
            rows = json.loads((current_output(storage.layout(), concept, "controlnet_model") / "lineage.json")
                              .read_text())["training_images"]
            assert len(rows) == 4 and all(r["control_source"].startswith(source) for r in rows), rows[0]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["embedded-sdxl", "embedded-sd3", "embedded-flux"])
def test_controlnet_on_sdxl_and_the_flow_matching_families_trains_on_the_concepts_own_pairs(tmp_path, flow_root,
                                                                                              source):
    """Issue 29, point 5: the pairs are family-agnostic (SDXL: two text encoders, micro-conditioning; SD 3.x and
    Flux.1: a transformer whose ControlNet is conditioned on the pairs' VAE latents); ControlNet trains on them and
    its lineage names each pair's file."""
    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.hashing import sha256_file
    from assets_pipeline.resources import PipelineStorage
    from assets_pipeline.training.reuse import current_output
    from conftest import link_models

    data = tmp_path / "data"
    storage = PipelineStorage(data_root=str(data), artifact_root=str(link_models(flow_root, tmp_path / "art")))
    imgs = {k: photo(v, (96, 64)) for k, v in PHOTOS.items() if k != "e"}
    folder, _ = folder_with_pairs(data, "xl", spec='token = "sks"\nmethods = ["controlnet"]\n'
                                  f'[base_model]\nsource = "{source}"\n',
                                  files={f"control/{k}.png": png(edges(img)) for k, img in imgs.items()})
    (folder / "e.png").unlink()
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["xl"])
        res = dg.materialize([*ASSETS, *CHECKS], selection=DATASET | dg.AssetSelection.assets("controlnet_model"),
                             partition_key="xl", instance=instance, resources={**default_resources(),
                                                                                "storage": storage})
    assert res.success
    out = current_output(storage.layout(), "xl", "controlnet_model")
    manifest = json.loads((out / "lineage.json").read_text())
    assert manifest["base_model"]["family"] == {"embedded-sdxl": "sdxl", "embedded-sd3": "sd3",
                                                "embedded-flux": "flux"}[source]
    assert {r["source_path"]: (r["control_source"], r["control_sha256"]) for r in manifest["training_images"]} == {
        f"{k}.png": (f"control/{k}.png", sha256_file(folder / "control" / f"{k}.png")) for k in "abcd"}


@pytest.mark.slow
def test_controlnet_holds_pairs_out_of_training_for_its_validation_where_there_are_enough(tmp_path, built_models):
    """Issue 29, point 4: with at least MIN_TRAINING_PAIRS + validation_holdout pairs, the pairs of the lowest photo
    sha256 are never trained on; the validation renders follow their conditioning images, the manifest lists them
    apart, and lineage finds the output from them as a validation pair. ``validation_holdout = 0`` trains on all."""
    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.hashing import sha256_file
    from assets_pipeline.lineage import outputs_trained_on
    from assets_pipeline.resources import PipelineStorage
    from assets_pipeline.training.methods.controlnet import MIN_TRAINING_PAIRS
    from assets_pipeline.training.reuse import current_output
    from conftest import link_models

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "grass", "camera", "coins",
             "immunohistochemistry", "retina"]
    assert len(names) == MIN_TRAINING_PAIRS + 2
    data = tmp_path / "data"
    storage = PipelineStorage(data_root=str(data), artifact_root=str(link_models(built_models, tmp_path / "art")))
    imgs = {n: photo(n, (96, 64)) for n in names}
    files = {f"{n}.png": png(img) for n, img in imgs.items()}
    files.update({f"control/{n}.png": png(edges(img)) for n, img in imgs.items()})
    folder = write_concept(data, "many", files, 'token = "sks"\nmethods = ["controlnet"]\n')
    resources = {**default_resources(), "storage": storage}
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["many"])

        def build():
            res = dg.materialize([*ASSETS, *CHECKS], selection=DATASET | dg.AssetSelection.assets("controlnet_model"),
                                 partition_key="many", instance=instance, resources=resources)
            assert res.success
            checks = {c.check_name: c.passed for c in res.get_asset_check_evaluations()}
            assert checks["manifest_lists_training_images"] and checks["control_pairs_valid"], checks
            out = current_output(storage.layout(), "many", "controlnet_model")
            return out, json.loads((out / "lineage.json").read_text())

        out, manifest = build()
        subset = {r["source_path"] for r in manifest["training_images"]} | {
            r["source_path"] for r in manifest.get("validation_pairs", [])}
        assert subset == set(files) - {f"control/{n}.png" for n in names}, "a photo left the subset: pick others"
        shas = sorted(sha256_file(folder / p) for p in subset)
        held = manifest["validation_pairs"]
        assert [r["image_sha256"] for r in held] == shas[:2]
        assert all(r["control_sha256"] == sha256_file(folder / r["control_source"]) for r in held)
        assert sorted(r["image_sha256"] for r in manifest["training_images"]) == shas[2:]
        # validation follows a held-out pair's conditioning image, never a training one
        shown = np.asarray(Image.open(out / "validation" / "p0_seed0_conditioning.png").convert("RGB"))
        held_controls = [np.asarray(Image.open(folder / r["control_source"]).convert("RGB").resize(
            (shown.shape[1], shown.shape[0]))) for r in held]
        trained_controls = [np.asarray(Image.open(folder / r["control_source"]).convert("RGB").resize(
            (shown.shape[1], shown.shape[0]))) for r in manifest["training_images"]]
        diff = lambda a, b: float(np.abs(a.astype(float) - b.astype(float)).mean())  # noqa: E731
        assert min(diff(shown, c) for c in held_controls) < min(diff(shown, c) for c in trained_controls)
        # either half of a held-out pair finds the output, as a validation pair
        found = outputs_trained_on(storage.artifact_path(), held[0]["control_sha256"])
        assert list(found["output"]) == [str(out)]
        assert list(found["match"]) == ["content: conditioning image (held out of training: a validation pair)"]

        # validation_holdout = 0: every pair trained on, a new output (another job)
        (folder / "concept.toml").write_text('token = "sks"\nmethods = ["controlnet"]\n[controlnet]\n'
                                             "validation_holdout = 0\n")
        out0, manifest0 = build()
        assert out0 != out and "validation_pairs" not in manifest0
        assert sorted(r["image_sha256"] for r in manifest0["training_images"]) == shas
        assert manifest0["job_identity"] != manifest["job_identity"]
