"""training/validation.py: how much a validation costs, and validation during training: strips of the fixed
prompts and seeds every ``validation_steps`` steps, ``select_best``, resume, and the default (off) leaving training
as it was; DreamBooth (no prior preservation) on a synthetic 3-photo latents bundle of the embedded SD 1.x model,
through the loop and write_output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import numpy as np
import pytest
import torch

from assets_pipeline.resources import TrainerLauncher
from assets_pipeline.training.config import TrainConfig
from assets_pipeline.training.methods import get_method
from helpers import write_synthetic_bundle
from tests.conftest import link_models



@dg.asset
def trained(context, trainer: TrainerLauncher, job_path: dg.ResourceParam[str]):
    """As the model assets do: launch the trainer on a job file and pass on what it reports."""
    yield from trainer.launch(context, Path(job_path)).get_results()


@pytest.fixture(scope="module")
def make_job(built_models, tmp_path_factory):
    from PIL import Image
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.training.job import TrainJob
    from helpers import training_row

    root = tmp_path_factory.mktemp("validation_steps")
    artifacts = link_models(built_models, root / "artifacts")
    write_synthetic_bundle(root)
    rows = []
    for i, s in enumerate("abc"):  # the photos CLIP-I compares with
        path = root / f"{s}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        rows.append(training_row(image_sha256=s, role="instance", caption="a photo of sks dog",
                                 source_path=str(path), decoded_path=str(path)))
    ref = resolve_base_model("embedded", artifacts)

    def job(name: str, **cfg) -> TrainJob:
        config = get_method("dreambooth").config_cls(**{
            "with_prior_preservation": False, "max_train_steps": 4, "checkpointing_steps": 2, "learning_rate": 1e-3,
            **cfg})
        return TrainJob(concept="c", method="dreambooth", config=config, base_model=ref,
                        latents_dir=str(root), output_dir=str(root / name / "out"),
                        checkpoint_dir=str(root / name / "checkpoints"), token="sks", class_noun="dog", lineage={},
                        device="cpu", mixed_precision="no", training_images=tuple(rows), validation_inference_steps=2,
                        validation_seeds=(0,), scorer={"model_name": "embedded", "artifact_root": str(artifacts)})

    return job


def _train_and_write(job):
    from assets_pipeline.training.loop import train
    from assets_pipeline.training.output import write_output

    messages: list[str] = []
    state = train(job, messages.append)
    result = write_output(job, state, "cpu")
    return SimpleNamespace(job=job, state=state, result=result, out=Path(job.output_dir), messages=messages)


@pytest.fixture(scope="module")
def earlier_steps_score_higher():
    """The embedded CLIP's weights are random, so which step scores best is arbitrary: after the real scoring,
    each step's CLIP-I is lowered by its step number, so step 2 is chosen and select_best's output is not simply
    the last step's weights."""
    from assets_pipeline.training.validation import StepValidation

    real = StepValidation._score

    def score(self, record, images, prompts):
        real(self, record, images, prompts)
        record["clip_i"] -= record["step"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StepValidation, "_score", score)
        yield


@pytest.fixture(scope="module")
def validated(make_job, earlier_steps_score_higher):
    """4 steps, validated every 2, the output's weights from the step with the best CLIP-I."""
    return _train_and_write(make_job("validated", validation_steps=2, select_best="clip_i"))


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_strips_for_every_validated_step_with_the_fixed_prompts_and_seeds(validated):
    table = json.loads((validated.out / "validation_steps.json").read_text())
    assert [r["step"] for r in table["steps"]] == [2, 4] and table["every"] == 2
    final = json.loads((validated.out / "metrics.json").read_text())
    for r in table["steps"]:
        # The final validation's prompts and seeds, the same at every step.
        assert sorted(img["prompt"] for img in r["images"]) == final["validation_prompts"]
        assert {img["seed"] for img in r["images"]} == set(final["validation_seeds"])
        assert all((validated.out / img["file"]).is_file() for img in r["images"])
        assert (validated.out / r["strip"]).is_file()
        assert np.isfinite(r["clip_i"]) and np.isfinite(r["clip_t"])
    step2, step4 = ([_pixels(validated.out / img["file"]) for img in r["images"]] for r in table["steps"])
    assert all(np.abs(a - b).mean() > 0 for a, b in zip(step2, step4))  # the weights changed between the steps
    csv_rows = (validated.out / "validation_steps.csv").read_text().splitlines()
    assert csv_rows[0] == "step,prompt,seed,file,clip_t,clip_i" and len(csv_rows) == 1 + 2 * 2
    assert [m for m in validated.messages if m.startswith("validated step")][0].startswith("validated step 2: 2 images")


@pytest.mark.slow
def test_select_best_takes_the_best_steps_weights_and_stock_diffusers_loads_them(validated):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from assets_pipeline.training.checkpoints import checkpoint_root

    table = json.loads((validated.out / "validation_steps.json").read_text())
    scores = {r["step"]: r["clip_i"] for r in table["steps"]}
    chosen = max(scores, key=scores.get)
    assert chosen == 2 and scores[2] > scores[4]
    metrics = json.loads((validated.out / "metrics.json").read_text())
    lineage = json.loads((validated.out / "lineage.json").read_text())
    assert table["selected_step"] == metrics["selected_step"] == chosen and metrics["selected_metric"] == "clip_i"
    assert lineage["validation_during_training"] == {"every": 2, "select_best": "clip_i", "selected_step": chosen}
    # The weights of step 2 (its checkpoint's, accelerate's model file), not the last step's.
    want = load_file(str(checkpoint_root(validated.job) / "step-2" / "model.safetensors"))
    got = load_file(str(validated.out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    last = validated.state.models.denoiser.state_dict()
    assert any(not torch.equal(got[k], last[k]) for k in got)
    pipe = StableDiffusionPipeline.from_pretrained(validated.out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]
    assert np.isfinite(img).all()


@pytest.mark.slow
def test_the_ui_shows_the_strips_and_the_chosen_steps_numbers(validated):
    from assets_pipeline.training.validation import step_views

    views = step_views(validated.out)
    kind, md = views["validation_steps"]
    assert kind == "md" and md.startswith("![validation during training, per step](data:image/jpeg;base64,")
    assert views["selected_step"] == ("int", validated.result["selected_step"])
    assert views["selected_clip_i"][0] == "float" and views["validation_steps_path"][0] == "path"
    from assets_pipeline.assets.models import VIEW_KINDS  # how a reused output's materialization repeats them

    reused = {k: VIEW_KINDS[t](v) for k, (t, v) in views.items()}
    assert isinstance(reused["selected_step"], dg.IntMetadataValue) and reused["validation_steps"].value == md


@pytest.mark.slow
def test_validation_does_not_change_what_is_learned_and_off_writes_nothing(validated, make_job):
    job = make_job("plain", validation_steps=0)
    plain = _train_and_write(job)
    assert plain.state.losses == validated.state.losses  # rendering drew nothing from training's RNG
    assert all(torch.equal(a, b) for a, b in zip(plain.state.models.denoiser.parameters(),
                                                  validated.state.models.denoiser.parameters()))
    assert not (plain.out / "validation_steps").exists() and not (plain.out / "validation_steps.json").exists()
    assert "validation_during_training" not in json.loads((plain.out / "lineage.json").read_text())
    assert "selected_step" not in plain.result and "validation_s" not in plain.state.stats
    from assets_pipeline.training.checkpoints import checkpoint_root
    from assets_pipeline.training.validation import step_views

    assert sorted(p.name for p in checkpoint_root(job).iterdir()) == ["step-2"]
    assert sorted(p.name for p in (checkpoint_root(job) / "step-2").iterdir()) == sorted(
        p.name for p in (checkpoint_root(validated.job) / "step-2").iterdir() if p.name != "validation_steps")
    assert step_views(plain.out) == {}


@pytest.mark.slow
def test_resume_keeps_the_strips_of_the_steps_before_the_checkpoint(validated, make_job):
    from assets_pipeline.training.checkpoints import checkpoint_root

    job = make_job("resumed", validation_steps=2, select_best="clip_i")
    assert job.identity() == validated.job.identity()  # the same job, in another checkpoint folder
    shutil.copytree(checkpoint_root(validated.job) / "step-2", checkpoint_root(job) / "step-2")
    resumed = _train_and_write(job)
    assert resumed.state.resumed_from == 2
    assert [m.split(":")[0] for m in resumed.messages if m.startswith("validated step")] == ["validated step 4"]
    table = json.loads((resumed.out / "validation_steps.json").read_text())
    first = json.loads((validated.out / "validation_steps.json").read_text())
    assert table == first  # step 2 from the checkpoint, step 4 validated again: the same images, scores, choice
    for r in table["steps"]:
        for img in r["images"]:
            assert np.array_equal(_pixels(resumed.out / img["file"]), _pixels(validated.out / img["file"]))
    # The best step (2) was before the checkpoint: its saved output came back with the checkpoint.
    from safetensors.torch import load_file

    unet = "unet/diffusion_pytorch_model.safetensors"
    got, want = load_file(str(resumed.out / unet)), load_file(str(validated.out / unet))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("cfg, match", [
    ({"validation_steps": -1}, "validation_steps = -1 must be >= 0"),
    ({"select_best": "loss"}, "select_best = 'loss' is not one of"),
    ({"select_best": "clip_t"}, "select_best = 'clip_t' .* set validation_steps > 0"),
])
def test_bad_values_name_the_key_and_value(cfg, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**cfg)
    from assets_pipeline.concept import ConceptSpecError
    from assets_pipeline.partitions.concept_spec import check_section

    with pytest.raises(ConceptSpecError, match=rf"\[lora\].*{match}"):
        check_section("lora", cfg, "c/concept.toml [lora]")


@pytest.mark.slow
def test_the_trainer_reports_the_strips_in_its_materialization(make_job, tmp_path):
    """The trainer program under Dagster Pipes, as the model assets launch it: the materialization carries the
    sheet of strips, the folder and the chosen step's numbers; the checkpoint folder (snapshots included) is gone."""
    from assets_pipeline.training.checkpoints import checkpoint_root

    job = make_job("pipes", validation_steps=2, select_best="clip_t", max_train_steps=2)
    job.save(tmp_path / "job.json")
    with dg.DagsterInstance.ephemeral() as instance:
        res = dg.materialize([trained], instance=instance, resources={"trainer": TrainerLauncher(device="cpu"),
                                                                      "job_path": str(tmp_path / "job.json")})
    assert res.success
    (event,) = res.get_asset_materialization_events()
    md = event.materialization.metadata
    assert md["validation_steps"].value.startswith("![validation during training, per step](data:image/jpeg;")
    assert md["validation_steps_path"].value == str(Path(job.output_dir) / "validation_steps")
    assert isinstance(md["selected_step"], dg.IntMetadataValue) and md["selected_step"].value == 2
    assert isinstance(md["selected_clip_t"], dg.FloatMetadataValue) and "preview" in md
    assert not checkpoint_root(job).exists()


@pytest.mark.parametrize("images, renders, steps", [
    (200, 4, 11),   # the overhead benchmark's job: 100 LoRA steps at batch 2, 2 prompts x 2 seeds
    (1, 4, 10),     # never fewer than 10 steps
    (600, 4, 25),   # a usual SD 1.5 LoRA (600 steps at batch 1): the full 25 steps of diffusers' scripts
    (600, 8, 16),   # twice the renders (a LoRA with a second concept's prompt): half the steps each
])
def test_validation_costs_in_proportion_to_the_training(images, renders, steps):
    from assets_pipeline.training.validation import validation_inference_steps

    assert validation_inference_steps(images, renders) == steps
