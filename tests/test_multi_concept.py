"""Several concepts in one LoRA (kohya-ss' multi-folder datasets): ``[[lora.datasets]]`` in concept.toml lists
other concepts, each with its own repeats and its own token (its captions), trained in with the concept's photos.

One build through Dagster: concept ``rusty`` (3 photos, token sks) trains a LoRA that also takes concept
``tabby`` (3 other photos, token zwx, no methods of its own) at repeats 2."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest

from helpers import write_concept, write_synthetic_bundle

MAIN, OTHER = "rusty", "tabby"
MAIN_PHOTOS = ("astronaut.png", "coffee.png", "rocket.jpg")
OTHER_PHOTOS = ("chelsea.png", "motorcycle.webp", "grace_hopper.jpg")
MAIN_SPEC = """token = "sks"
class_noun = "dog"
methods = ["lora"]

[lora]
repeats = 1

[[lora.datasets]]
concept = "tabby"
repeats = 2
"""
OTHER_SPEC = 'token = "zwx"\nclass_noun = "cat"\nmethods = []\n'


@pytest.fixture(scope="module")
def multi(tmp_path_factory, built_models):
    """Both concepts' dataset halves, then rusty's LoRA with its checks, in one Dagster instance."""
    from conftest import link_models

    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.demo_data import demo_files
    from assets_pipeline.resources import PipelineStorage

    root = tmp_path_factory.mktemp("multi")
    files = demo_files()
    write_concept(root / "data", MAIN, {k: files[k] for k in MAIN_PHOTOS}, MAIN_SPEC)
    write_concept(root / "data", OTHER, {k: files[k] for k in OTHER_PHOTOS}, OTHER_SPEC)
    storage = PipelineStorage(data_root=str(root / "data"),
                              artifact_root=str(link_models(built_models, root / "artifacts")))
    resources = {**default_resources(), "storage": storage}
    dataset = "group:dataset or group:priors or group:latents"
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", [MAIN, OTHER])
        for concept in (OTHER, MAIN):
            assert dg.materialize(ASSETS, selection=dataset, partition_key=concept, instance=instance,
                                  resources=resources).success
        lora = [a for a in ASSETS if a.key == dg.AssetKey("lora_adapter")]
        trained = dg.materialize([*lora, *CHECKS], selection="lora_adapter", partition_key=MAIN, instance=instance,
                                 resources=resources, raise_on_error=False)
        again = dg.materialize([*lora, *CHECKS], selection="lora_adapter", partition_key=MAIN, instance=instance,
                               resources=resources, raise_on_error=False)
    current = storage.layout().asset_dir(MAIN, "lora_adapter")
    out = current / json.loads((current / "current.json").read_text())["path"]
    return storage, trained, again, out


def _mat_metadata(result, key="lora_adapter") -> dict:
    mats = [e.event_specific_data.materialization for e in result.all_events
            if e.event_type_value == "ASSET_MATERIALIZATION"
            and e.event_specific_data.materialization.asset_key == dg.AssetKey(key)]
    assert len(mats) == 1
    return {k: v.value for k, v in mats[0].metadata.items()}


@pytest.mark.slow
def test_lora_trains_on_both_concepts_and_its_checks_pass(multi):
    storage, trained, _, out = multi
    assert trained.success
    checks = [e.event_specific_data for e in trained.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert {c.check_name for c in checks} == {"weights_finite", "changes_base_output",
                                               "manifest_lists_training_images"}
    assert all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks if not c.passed]
    meta = _mat_metadata(trained)
    table = meta["datasets"]  # the UI's table of the concepts trained on
    assert "| rusty | sks | dog | 3 | 1 |" in table and "| tabby | zwx | cat | 3 | 2 |" in table
    versions = json.loads((out / "lineage.json").read_text())["input_data_versions"]
    assert versions["vae_latents[tabby]"] and versions["vae_latents"]


@pytest.mark.slow
def test_lineage_lists_each_concepts_photos_and_audits_them_in_their_own_folders(multi):
    from assets_pipeline.hashing import sha256_file
    from assets_pipeline.lineage import audit_output, outputs_trained_on

    storage, _, _, out = multi
    manifest = json.loads((out / "lineage.json").read_text())
    by_concept = {}
    for r in manifest["training_images"]:
        by_concept.setdefault((r["concept"], r["repeats"]), set()).add(r["source_path"])
    assert by_concept == {(MAIN, 1): set(MAIN_PHOTOS), (OTHER, 2): set(OTHER_PHOTOS)}
    assert manifest["datasets"] == [{"concept": OTHER, "token": "zwx", "class_noun": "cat", "repeats": 2}]
    assert all("zwx" in r["caption"] for r in manifest["training_images"] if r["concept"] == OTHER)
    assert manifest["num_processes"] == 1 and manifest["method_config"]["datasets"] == [
        {"concept": OTHER, "repeats": 2}]

    audit = audit_output(out, storage.data_path())
    assert set(audit["concept"]) == {MAIN, OTHER} and set(audit["status"]) == {"unchanged"}
    photo = storage.data_path() / OTHER / OTHER_PHOTOS[0]
    found = outputs_trained_on(storage.artifact_path(), sha256_file(photo))
    assert list(found["output"]) == [str(out)] and list(found["source_concept"]) == [OTHER]
    assert list(found["concept"]) == [MAIN]  # the output belongs to rusty


@pytest.mark.slow
def test_the_lineage_cli_names_each_photos_concept(multi, monkeypatch, capsys):
    from assets_pipeline.cli import main

    storage, _, _, out = multi
    monkeypatch.setenv("ASSETS_PIPELINE_ARTIFACTS", str(storage.artifact_path()))
    monkeypatch.setenv("ASSETS_PIPELINE_DATA", str(storage.data_path()))
    assert main(["lineage", "output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["concept", "source_path"]
    assert sorted((line.split()[0], line.split()[1]) for line in lines[1:]) == sorted(
        [(MAIN, p) for p in MAIN_PHOTOS] + [(OTHER, p) for p in OTHER_PHOTOS])
    assert main(["lineage", "image", str(storage.data_path() / OTHER / OTHER_PHOTOS[1]), "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["concept"], row["source_concept"], row["output"]) == (MAIN, OTHER, str(out))


@pytest.mark.slow
def test_validation_renders_each_concepts_prompt(multi):
    _, _, _, out = multi
    metrics = json.loads((out / "metrics.json").read_text())
    prompts = set(metrics["validation_prompts"])
    assert {"a photo of sks dog", "a photo of zwx cat"} <= prompts


@pytest.mark.slow
def test_an_unchanged_rebuild_reuses_and_the_schedule_sees_it_up_to_date(multi):
    from assets_pipeline.resources import BaseModelResource, ClipScorerResource, TrainerLauncher
    from assets_pipeline.schedules import plan_retraining

    storage, _, again, out = multi
    assert again.success
    meta = _mat_metadata(again)
    assert meta["reused"] is True and Path(meta["path"]) == out
    [decision] = plan_retraining(storage, BaseModelResource(), ClipScorerResource(), TrainerLauncher(), [MAIN])
    assert (decision.retrain, decision.reason) == (False, "up to date")


def _job(storage, spec_text: str, ref=None):
    from helpers import plan_for
    from assets_pipeline.partitions.concept_spec import parse_concept_toml
    from assets_pipeline.resources import BaseModelResource, ClipScorerResource, TrainerLauncher

    spec = parse_concept_toml(MAIN, spec_text)
    ref = ref or BaseModelResource().resolve(storage.layout().root, spec)
    return plan_for(storage, ref, spec, "lora", run_id="test", input_versions={}, trainer=TrainerLauncher(),
                    clip_scorer=ClipScorerResource())


@pytest.mark.slow
def test_repeats_and_the_listed_concepts_are_part_of_the_job_identity(multi):
    storage = multi[0]
    job = _job(storage, MAIN_SPEC)
    assert _job(storage, MAIN_SPEC.replace("repeats = 2", "repeats = 3")).identity() != job.identity()
    assert _job(storage, MAIN_SPEC.replace("repeats = 1", "repeats = 2")).identity() != job.identity()
    alone = _job(storage, 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora"]\n')
    assert alone.identity() != job.identity() and not alone.datasets
    assert all(r.concept is None for r in alone.training_images)  # a job without datasets is as it always was
    assert len(job.training_images) == 6 and len(alone.training_images) == 3
    # the step count scales with every concept's photos (the embedded model's quick steps: 2 per 2 photos)
    assert job.config.max_train_steps > alone.config.max_train_steps


@pytest.mark.slow
@pytest.mark.parametrize("entry, message", [
    ('concept = "rusty"', "cannot list itself"),
    ('concept = "nobody"', "that concept's dataset is not built"),
])
def test_a_listed_concept_that_cannot_be_trained_in_is_refused_with_the_reason(multi, entry, message):
    from assets_pipeline.training.methods.base import TrainingInputError

    spec = MAIN_SPEC.replace('concept = "tabby"', entry)
    with pytest.raises(TrainingInputError, match=message) as e:
        _job(multi[0], spec)
    assert "rusty/concept.toml [[lora.datasets]]" in str(e.value)


@pytest.mark.slow
def test_a_listed_concept_with_a_damaged_bundle_names_the_file_and_the_fix(multi):
    import shutil

    from assets_pipeline.store import CorruptFile

    storage = multi[0]
    concepts = storage.layout().root / "concepts"
    shutil.copytree(concepts / OTHER, concepts / "broken")  # a copy of tabby's dataset, its bundle then damaged
    bundle = concepts / "broken" / "vae_latents" / "latents.safetensors"
    bundle.write_bytes(bundle.read_bytes()[:-100])
    try:
        with pytest.raises(CorruptFile, match="rematerialize vae_latents for concept 'broken'") as e:
            _job(storage, MAIN_SPEC.replace('concept = "tabby"', 'concept = "broken"'))
        assert str(bundle) in str(e.value)
    finally:
        shutil.rmtree(concepts / "broken")


@pytest.mark.slow
def test_a_listed_concept_from_another_base_model_is_refused(multi):
    from assets_pipeline.resources import BaseModelResource
    from assets_pipeline.training.methods.base import TrainingInputError

    storage = multi[0]
    ref = BaseModelResource().resolve(storage.layout().root)
    with pytest.raises(TrainingInputError, match="latents were made with another base model"):
        _job(storage, MAIN_SPEC, ref=replace(ref, fingerprint="f" * 64))


@pytest.mark.parametrize("section, message", [
    ('[[lora.datasets]]\nconcept = "tabby"\nrepeats = 0\n', "repeats = 0 must be an integer >= 1"),
    ('[[lora.datasets]]\nconcept = "tabby"\ntoken = "zwx"\n', "unknown keys \\['token'\\]"),
    ('[[lora.datasets]]\nconcept = "Tabby Cat"\n', "is not a concept name"),
    ('[[lora.datasets]]\nconcept = "tabby"\n[[lora.datasets]]\nconcept = "tabby"\n', "listed twice"),
    ('[lora]\ndatasets = "tabby"\n', "datasets = 'tabby' is str, expected a list, each a table"),
    ('[lora]\nrepeats = 0\n', "repeats must be >= 1"),
])
def test_bad_datasets_entries_name_the_file_key_and_value(section, message):
    from assets_pipeline.concept import ConceptSpecError
    from assets_pipeline.partitions.concept_spec import parse_concept_toml

    with pytest.raises(ConceptSpecError, match=message) as e:
        parse_concept_toml(MAIN, 'token = "sks"\nmethods = ["lora"]\n' + section)
    assert "rusty/concept.toml [lora]" in str(e.value)


def test_repeats_draw_a_row_that_often_per_epoch_and_rows_come_from_their_own_bundle(tmp_path):
    import torch
    from safetensors.torch import load_file

    from assets_pipeline.training.data import TrainingData
    from helpers import training_row

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    main = load_file(str(write_synthetic_bundle(tmp_path / "a", seed=0)))
    other = load_file(str(write_synthetic_bundle(tmp_path / "b", seed=1)))
    rows = [{"image_sha256": s, "role": "instance", "caption": s, "concept": "a", "repeats": 1} for s in "abc"]
    rows += [{"image_sha256": "b", "role": "instance", "caption": "other b", "concept": "b", "repeats": 3}]
    rows = [training_row(**r) for r in rows]
    data = TrainingData.from_bundle(tmp_path / "a", rows, lambda c: c, control=False, datasets={"b": tmp_path / "b"})
    # the other bundle's row "b" is its own tensors, not the main bundle's row of the same sha256
    assert torch.equal(data.embeds[3], other["prompt_embeds"][1]) and torch.equal(data.embeds[1], main["prompt_embeds"][1])
    assert torch.equal(data.mean[0][3], other["latent_mean@64x64"][1])
    epoch = data.indices(("instance",), 6, 0, seed=0, group=6)
    assert sorted(epoch) == [0, 1, 2, 3, 3, 3]  # one epoch: each row as often as its repeats
    alone = TrainingData.from_bundle(tmp_path / "a", rows[:3], lambda c: c, control=False)
    assert torch.equal(alone.mean[0], main["latent_mean@64x64"]) and sorted(alone.indices(("instance",), 3, 0, 0, 3)) \
        == [0, 1, 2]


@pytest.mark.slow
def test_a_change_in_a_listed_concept_makes_the_lora_stale(multi):
    """Last in this module (it changes tabby): a new caption in tabby, once tabby's dataset is rebuilt, makes
    rusty's LoRA due for retraining; rusty's own dataset did not change."""
    from assets_pipeline.definitions import ASSETS, default_resources
    from assets_pipeline.resources import BaseModelResource, ClipScorerResource, TrainerLauncher
    from assets_pipeline.schedules import plan_retraining

    storage = multi[0]
    stem = Path(OTHER_PHOTOS[0]).stem
    (storage.data_path() / OTHER / f"{stem}.txt").write_text("a photo of zwx cat asleep on a sofa")
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("concepts", [OTHER])
        assert dg.materialize(ASSETS, selection="group:dataset or group:priors or group:latents", partition_key=OTHER,
                              instance=instance, resources={**default_resources(), "storage": storage}).success
    [decision] = plan_retraining(storage, BaseModelResource(), ClipScorerResource(), TrainerLauncher(), [MAIN])
    assert decision.retrain and decision.reason == "training inputs changed", decision
    job = _job(storage, MAIN_SPEC)
    assert "a photo of zwx cat asleep on a sofa" in {r.caption for r in job.training_images if r.concept == OTHER}


def _sdxl_like_bundle(root: Path, seed: int, flips: bool) -> None:
    """Two 64 px instance rows ("a", "b") with SDXL's per-row tensors (pooled embeddings, time ids) and, with
    ``flips``, flipped latents and their time ids."""
    import torch
    from safetensors.torch import save_file

    from assets_pipeline.store import record_digest

    g = torch.Generator().manual_seed(seed)
    tensors = {"prompt_embeds": torch.randn(2, 77, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
               "add_time_ids": torch.randn(2, 6, generator=g), "latent_mean@64x64": torch.randn(2, 4, 8, 8, generator=g),
               "latent_std@64x64": torch.full((2, 4, 8, 8), 0.1)}
    if flips:
        tensors.update({"flip_latent_mean@64x64": torch.randn(2, 4, 8, 8, generator=g),
                        "flip_latent_std@64x64": torch.full((2, 4, 8, 8), 0.2),
                        "flip_add_time_ids": torch.randn(2, 6, generator=g)})
    root.mkdir()
    save_file(tensors, str(root / "latents.safetensors"), metadata={
        "image_sha256": '["a", "b"]', "role": '["instance", "instance"]', "bucket": '["64x64", "64x64"]'})
    record_digest(root / "latents.safetensors")


def test_rows_of_a_bundle_without_flips_are_never_flipped_and_keep_their_sdxl_tensors(tmp_path):
    import torch
    from safetensors.torch import load_file

    from assets_pipeline.training.data import TrainingData
    from helpers import training_row

    _sdxl_like_bundle(tmp_path / "main", 0, flips=True)
    _sdxl_like_bundle(tmp_path / "other", 1, flips=False)
    main, other = (load_file(str(tmp_path / n / "latents.safetensors")) for n in ("main", "other"))
    rows = [{"image_sha256": "a", "role": "instance", "caption": "a", "concept": "main", "repeats": 1},
            {"image_sha256": "b", "role": "instance", "caption": "b", "concept": "other", "repeats": 1}]
    data = TrainingData.from_bundle(tmp_path / "main", [training_row(**r) for r in rows], lambda c: c, control=False,
                                    datasets={"other": tmp_path / "other"})
    assert torch.equal(data.pooled[1], other["pooled_prompt_embeds"][1])
    assert torch.equal(data.time_ids[0], main["add_time_ids"][0]) and torch.equal(data.time_ids[1], other["add_time_ids"][1])
    # the other bundle has no flipped latents: its "flipped" row is its unflipped one, time ids included
    assert torch.equal(data.flip_mean[0][1], other["latent_mean@64x64"][1])
    assert torch.equal(data.flip_time_ids[1], other["add_time_ids"][1])
    assert torch.equal(data.flip_mean[0][0], main["flip_latent_mean@64x64"][0])
    g = torch.Generator().manual_seed(0)
    [batch] = data.draw([0, 1, 0, 1], g, scaling_factor=1.0, random_flip=True)
    assert batch.latents.shape == (4, 4, 8, 8) and batch.pooled_embeds.shape == (4, 32)
