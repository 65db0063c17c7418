"""What the Dagster UI shows (issue 28, point 15): measurements rounded for display (files keep full precision),
caption counts that add up to the rows, the model assets' descriptions, the change check's explanation, and the
demo's runs named by their job."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from helpers import encode, make_job, photo, write_concept

SPEC = 'token = "sks"\nclass_noun = "cat"\nmethods = ["lora"]\n'
DATASET = ["raw_images", "captioned_images", "filtered_images", "clip_scored_images"]


def significant_digits(x: float) -> int:
    return len(repr(x).split("e")[0].replace("-", "").replace(".", "").lstrip("0").rstrip("0") or "0")


def test_shown_rounds_measurements_to_four_significant_digits():
    from assets_pipeline.display import shown, shown_metadata

    assert shown(0.2192746102809906) == 0.2193 and shown(0.0012345678) == 0.001235
    assert shown(12345.67) == 12346.0 and shown(-0.5555555) == -0.5556
    assert [shown(v) for v in (0.0, 3, True, None, "x")] == [0.0, 3, True, None, "x"]
    assert shown(float("inf")) == float("inf")
    assert shown_metadata({"clip_t": 0.2192746102809906, "steps": 8, "path": "/x"}) == {
        "clip_t": 0.2193, "steps": 8, "path": "/x"}


class FakeCaptioner:
    fingerprint = "fake-captioner-v1"

    def caption(self, images: list) -> list[str]:
        return [f"a cat, {im.width} px wide" for im in images]


class FakeCaptionerResource(dg.ConfigurableResource):
    def load(self, artifact_root, device, max_new_tokens=30):
        return FakeCaptioner()


@pytest.fixture
def concept_roots(tmp_path, built_models, monkeypatch):
    """Three photos of a concept (one with a sidecar caption), its roots and a DAGSTER_HOME, in the environment
    as `assets-pipeline demo` reads them."""
    from conftest import link_models
    from assets_pipeline.paths import ARTIFACTS_ENV, DATA_ENV

    data = tmp_path / "data"
    files = {f"{name}.jpg": encode(photo(name, (160, 128)), "JPEG", quality=92)
             for name in ("astronaut", "chelsea", "coffee")}
    write_concept(data, "kitty", {**files, "chelsea.txt": b"sks cat on a blanket"}, SPEC)
    monkeypatch.setenv(DATA_ENV, str(data))
    monkeypatch.setenv(ARTIFACTS_ENV, str(link_models(built_models, tmp_path / "artifacts")))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    return tmp_path


def _metadata(res) -> dict[str, dict]:
    return {e.materialization.asset_key.to_user_string(): {k: getattr(v, "value", v)
                                                          for k, v in e.materialization.metadata.items()}
            for e in res.get_asset_materialization_events()}


def test_demo_runs_are_named_and_their_numbers_are_rounded_and_add_up(concept_roots):
    """`assets-pipeline demo`'s runs are `train_concept` runs (the UI lists the job's name and the partition, not
    `__ephemeral_asset_job__`); captioned_images' counts add up to its rows; mean_clip_score is rounded while
    scores.parquet keeps full precision."""
    from assets_pipeline.cli import build_concepts
    from assets_pipeline.jobs import TRAINING_RUN_TAGS
    from assets_pipeline.tables import read_table

    [(concept, res)] = build_concepts(["kitty"], asset_selection=[dg.AssetKey(a) for a in DATASET])
    assert res.success
    with dg.DagsterInstance.get() as instance:
        run = instance.get_run_by_id(res.run_id)
    assert run.job_name == "train_concept"
    assert run.tags["dagster/partition"] == "kitty" and TRAINING_RUN_TAGS.items() <= run.tags.items()
    md = _metadata(res)
    assert set(md) == set(DATASET)

    captions = md["captioned_images"]  # no captioner configured: every caption is a sidecar or the template
    assert (captions["items_computed"], captions["items_cached"], captions["items_not_cached"]) == (0, 0, 3)
    assert captions["captions_from_sidecar"] == 1 and captions["captions_from_template"] == 2

    shown = md["clip_scored_images"]["mean_clip_score"]
    scores = read_table(Path(md["clip_scored_images"]["path"]) / "scores.parquet")
    exact = float(scores["clip_score"].mean())
    assert significant_digits(exact) > 4  # the table keeps what was measured
    assert shown == pytest.approx(exact, rel=1e-3) and significant_digits(shown) <= 4
    for asset, values in md.items():  # no float anywhere in the dataset assets' metadata is shown unrounded
        for key, value in values.items():
            if isinstance(value, float):
                assert significant_digits(value) <= 4, (asset, key, value)
    # The preview table too: each photo's score to 4 significant digits (tabulate alone shows 6).
    rows = [line.split("|")[1:-1] for line in md["clip_scored_images"]["preview"].splitlines()[2:]]
    shown_scores = [float(cells[1]) for cells in rows]
    assert len(shown_scores) == 3 and all(significant_digits(x) <= 4 for x in shown_scores)
    assert sorted(shown_scores) == pytest.approx(sorted(scores["clip_score"]), rel=1e-3)


def test_caption_counts_are_the_captioners_and_add_up_to_the_rows(concept_roots):
    """With a captioner: the photos without a sidecar are computed once, then read from the cache; the sidecar's
    caption is counted as not cached, every time."""
    from assets_pipeline.definitions import ASSETS, default_resources

    resources = {**default_resources(), "captioner": FakeCaptionerResource()}
    counts = []
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", ["kitty"])
        for _ in range(2):
            res = dg.materialize(ASSETS, selection=["raw_images", "captioned_images"], partition_key="kitty",
                                 instance=instance, resources=resources)
            md = _metadata(res)["captioned_images"]
            counts.append((md["items_computed"], md["items_cached"], md["items_not_cached"], md["dagster/row_count"]))
    assert counts == [(2, 0, 1, 3), (0, 2, 1, 3)]


def test_model_assets_say_what_they_train_and_how_their_output_loads():
    from assets_pipeline.assets.models import MODEL_ASSETS

    loads = {"lora_adapter": "load_lora_weights", "dreambooth_model": "StableDiffusionPipeline.from_pretrained",
             "textual_inversion_embedding": "load_textual_inversion",
             "controlnet_model": "ControlNetModel.from_pretrained"}
    described = {a.key.to_user_string(): a.descriptions_by_key[a.key] for a in MODEL_ASSETS}
    assert set(described) == set(loads)
    for asset, text in described.items():
        assert loads[asset] in text, asset
        assert f"artifacts/concepts/<concept>/{asset}/" in text, asset
        for key in ("clip_t", "clip_i", "mean_abs_change_vs_base", "reused", "changes_base_output"):
            assert f"`{key}`" in text or key in text, (asset, key)
        assert len(text.split()) > 100, asset  # not one word ("lora")


def test_the_change_check_explains_measured_before_and_rounds_only_what_it_shows():
    from assets_pipeline.assets.checks import change_result

    fresh, cached = change_result(0.012345678, False), change_result(1.23456e-9, True)
    assert fresh.metadata["mean_abs_change"].value == 0.01235 and fresh.passed
    assert fresh.metadata["measured_before"].value is False and cached.metadata["measured_before"].value is True
    assert cached.passed  # decided on the measurement, not on the rounded figure
    for result in (fresh, cached):
        assert "mean_abs_change: the mean absolute pixel difference (0 to 1)" in result.description
        assert "measured_before: " in result.description
    assert "read from the check_results cache instead of rendering again" in cached.description
    assert "rendered and measured by this check" in fresh.description
    assert change_result(0.0, False).passed is False


def test_the_trainer_and_a_reused_output_show_rounded_numbers_and_keep_them_whole_in_metrics(tmp_path):
    """The trainer's materialization (through Pipes) and a reuse's repeat the same rounded key numbers."""
    from assets_pipeline.training.output import materialization_metadata
    from assets_pipeline.training.reuse import Reuse, reuse_metadata

    result = {"clip_t": 0.2192746102809906, "clip_i": 0.87654321, "mean_abs_change_vs_base": 0.0123456789,
              "final_loss": 0.123456789, "steps": 8, "lineage_sha256": "ab" * 32, "scorer_is_random": True,
              "preview_md": "grid"}
    state = SimpleNamespace(resumed_from=None, stats={"images_per_s": 12.3456, "num_processes": 1})
    md = materialization_metadata(make_job("lora", output_dir=str(tmp_path)), state, result)
    assert (md["clip_t"], md["clip_i"], md["mean_abs_change_vs_base"], md["final_loss"]) == (
        0.2193, 0.8765, 0.01235, 0.1235)
    assert md["steps"] == 8 and md["images_per_s"] == 12.35 and md["lineage_sha256"] == "ab" * 32
    reused = reuse_metadata(Reuse(tmp_path, {"run_id": "r", "training_images": []},
                                  {**{k: v for k, v in result.items() if k != "preview_md"},
                                   "training_speed": {"images_per_s": 12.3456}}))
    assert {k: reused[k] for k in ("clip_t", "clip_i", "mean_abs_change_vs_base", "final_loss", "images_per_s")} \
        == {k: md[k] for k in ("clip_t", "clip_i", "mean_abs_change_vs_base", "final_loss", "images_per_s")}
