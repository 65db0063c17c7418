"""The method registry, configs, refusals and step scaling: pure, no training."""

from __future__ import annotations

import pytest

from assets_pipeline.training.config import TrainConfig
from assets_pipeline.training.methods import get_method, method_names
from assets_pipeline.training.methods.base import TrainContext, TrainingInputError


def ctx(**kw):
    base = dict(concept="c", token="sks", class_noun="dog", resolution=64, num_instance_images=5,
                num_class_images=8, num_control_images=5)
    return TrainContext(**{**base, **kw})


def test_registry_has_the_four_methods_and_fails_loudly():
    assert method_names() == ["controlnet", "dreambooth", "lora", "textual_inversion"]
    with pytest.raises(KeyError, match="registered"):
        get_method("hypernetwork")


@pytest.mark.parametrize("method, lr", [("lora", 1e-4), ("dreambooth", 5e-6), ("textual_inversion", 5e-4),
                                        ("controlnet", 1e-5)])
def test_defaults_follow_diffusers_examples(method, lr):
    cfg = get_method(method).config_cls()
    assert cfg.learning_rate == lr
    if method == "lora":
        assert cfg.rank == 4
    if method == "dreambooth":
        assert (cfg.prior_loss_weight, cfg.num_class_images) == (1.0, 100)


def test_steps_scale_with_dataset_size_within_bounds():
    cfg = TrainConfig()
    assert cfg.total_steps(1) == cfg.min_train_steps
    assert cfg.total_steps(5) == 500 and cfg.total_steps(10) == 1000
    assert cfg.total_steps(1000) == cfg.max_scaled_steps
    assert TrainConfig(max_train_steps=7).total_steps(1000) == 7


@pytest.mark.parametrize("method", ["lora", "dreambooth", "textual_inversion", "controlnet"])
def test_fewer_than_three_images_is_refused_with_what_to_fix(method):
    m = get_method(method)
    with pytest.raises(TrainingInputError, match="at least 3 photos"):
        m.check_inputs(ctx(num_instance_images=2), m.config_cls())


def test_dreambooth_refuses_without_class_noun_or_class_images():
    m = get_method("dreambooth")
    with pytest.raises(TrainingInputError, match="class noun"):
        m.check_inputs(ctx(class_noun=""), m.config_cls())
    with pytest.raises(TrainingInputError, match="no class images"):
        m.check_inputs(ctx(num_class_images=0), m.config_cls())
    m.check_inputs(ctx(num_class_images=0), m.config_cls(with_prior_preservation=False))  # allowed


def test_controlnet_refuses_without_control_images():
    m = get_method("controlnet")
    with pytest.raises(TrainingInputError, match="control_images"):
        m.check_inputs(ctx(num_control_images=0), m.config_cls())


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="rank"):
        get_method("lora").config_cls(rank=0)
    with pytest.raises(ValueError, match="learning_rate"):
        get_method("controlnet").config_cls(learning_rate=0)


def test_textual_inversion_caption_uses_the_placeholder():
    m = get_method("textual_inversion")
    assert m.training_caption("a photo of sks dog on grass", ctx()) == "a photo of <sks> dog on grass"
    assert m.training_caption("a dog on grass", ctx()) == "a photo of <sks>, a dog on grass"
    assert m.training_caption("asksme sks", ctx()) == "asksme <sks>"


def test_dreambooth_loss_adds_weighted_prior_half():
    import torch

    m = get_method("dreambooth")
    losses = torch.tensor([1.0, 4.0, 3.0])  # per-row MSE: instance 1, class 4, instance 3
    is_class = torch.tensor([False, True, False])
    assert m.loss(losses, is_class, m.config_cls(prior_loss_weight=0.5)).item() == pytest.approx(2.0 + 0.5 * 4.0)
    assert m.loss(losses, is_class, m.config_cls(with_prior_preservation=False)).item() == pytest.approx(8 / 3)


def test_trainer_launch_command_uses_accelerate_for_several_gpus(tmp_path):
    import sys

    from assets_pipeline.resources import TrainerLauncher

    job = tmp_path / "job.json"
    assert TrainerLauncher().command(job) == [sys.executable, "-m", "assets_pipeline.training", "--job", str(job)]
    multi = TrainerLauncher(num_processes=4, accelerate_config_file="acc.yaml").command(job)
    assert multi[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4"]
    assert multi[5:7] == ["--config_file", "acc.yaml"]
    assert multi[7:] == ["-m", "assets_pipeline.training", "--job", str(job)]  # accelerate's --module form


@pytest.mark.parametrize("images, renders, steps", [
    (200, 4, 11),   # the overhead benchmark's job: 100 LoRA steps at batch 2, 2 prompts x 2 seeds
    (1, 4, 10),     # never fewer than 10 steps
    (600, 4, 25),   # a usual SD 1.5 LoRA (600 steps at batch 1): the full 25 steps of diffusers' scripts
    (600, 8, 16),   # twice the renders (a LoRA with a second concept's prompt): half the steps each
])
def test_validation_costs_in_proportion_to_the_training(images, renders, steps):
    from assets_pipeline.training.validation import validation_inference_steps

    assert validation_inference_steps(images, renders) == steps


def test_validation_renders_with_dpm_solver_built_from_the_models_scheduler():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    from assets_pipeline.training.output import use_validation_scheduler

    pipe = SimpleNamespace(scheduler=PNDMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear"))
    use_validation_scheduler(pipe)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    learned = SimpleNamespace(scheduler=DDPMScheduler(variance_type="learned_range"))
    use_validation_scheduler(learned)  # as train_dreambooth_lora.py: a learned variance is rendered fixed_small
    assert learned.scheduler.config.variance_type == "fixed_small"
