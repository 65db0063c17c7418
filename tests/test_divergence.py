"""A run that diverges (issue 28, point 2: ``learning_rate = inf`` trained on to NaN weights, which became current
and passed ``changes_base_output``): a non-finite learning rate is refused where the concept is read; a non-finite
loss stops training at the first logged step that has one, naming step, loss and learning rate, before any
checkpoint or output; trained weights with a non-finite value are never saved."""

from __future__ import annotations

import math

import pytest
import torch

from assets_pipeline.training.loop import DivergedTraining, check_weights
from helpers import make_job, write_synthetic_bundle


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_learning_rate_is_refused_where_the_concept_is_read(value):
    from assets_pipeline.partitions.concept_spec import parse_concept_toml

    with pytest.raises(ValueError, match=rf"c/concept.toml \[lora\]: learning_rate must be a finite number > 0, "
                                         rf"got {value.lstrip('-')}|got -inf"):
        parse_concept_toml("c", f'token = "sks"\nmethods = ["lora"]\n[lora]\nlearning_rate = {value}\n')


def test_a_diverging_run_stops_at_its_first_non_finite_loss_and_saves_nothing(tmp_path, embedded_model_dir):
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.training import loop

    write_synthetic_bundle(tmp_path)
    ref = resolve_base_model("embedded", embedded_model_dir.parents[1])
    ckpt = tmp_path / "checkpoints"
    # 1e30 is finite, so the config takes it; one clipped AdamW step moves every LoRA weight by ~1e30.
    job = make_job("lora", {"max_train_steps": 6, "learning_rate": 1e30, "checkpointing_steps": 3},
                   rows=[{"image_sha256": s, "role": "instance", "caption": "a photo of sks dog"} for s in "abc"],
                   base_model=ref, latents_dir=str(tmp_path), output_dir=str(tmp_path / "out"),
                   checkpoint_dir=str(ckpt), device="cpu", mixed_precision="no")
    logged = []
    with pytest.raises(DivergedTraining) as caught:
        loop.train(job, progress=logged.append)
    message = str(caught.value)
    step = int(message.split("step ")[1].split("/")[0])
    assert 1 < step <= 3 and "/6 has loss" in message and "learning rate 1e+30" in message
    assert "learning_rate in c/concept.toml (it is 1e+30; try 1e+29)" in message and "Nothing from this run" in message
    # Stopped at the log point that saw it, so no checkpoint was written from the diverged weights.
    assert not list(ckpt.rglob("step-*")) and not (tmp_path / "out").exists()
    assert all(math.isfinite(float(line.split("loss ")[1].split()[0])) for line in logged if "loss " in line)


def test_trained_weights_with_a_non_finite_value_are_refused():
    job = make_job("lora", {"learning_rate": 1e-4})
    finite = [torch.zeros(3, 4), torch.ones(5)]
    check_weights(finite, 10, job)
    broken = [torch.zeros(3, 4), torch.tensor([1.0, float("nan"), float("inf"), 2.0, 3.0])]
    with pytest.raises(DivergedTraining, match=r"ended after 10 steps with 2 of 17 trained values non-finite"):
        check_weights(broken, 10, job)


@pytest.mark.parametrize("section,setting,expected", [
    ("lora", "seed = 99999999999999999999", r"seed must be an integer in 0\.\.4294967295"),
    ("lora", "seed = -1", r"seed must be an integer in 0\.\.4294967295"),
    ("latents", "resolution = 100000", r"resolution must be a multiple of 8 .* in 64\.\.4096 px"),
    ("latents", "resolution = 0", r"resolution must be a multiple of 8 .* in 64\.\.4096 px.*got 0"),
    ("lora", "rank = 100000", r"rank must be an integer in 1\.\.3072, got 100000: a rank above a layer's width"),
    ("lora", "conv_rank = 5000", r"conv_rank must be an integer in 0\.\.3072, got 5000"),
])
def test_values_that_parse_but_cannot_train_are_refused_where_the_concept_is_read(section, setting, expected):
    """Issue 28, point 6 (in part): each refused naming the file, section, key, value and the allowed range."""
    from assets_pipeline.partitions.concept_spec import parse_concept_toml

    with pytest.raises(ValueError, match=rf"c/concept.toml \[{section}\]: {expected}"):
        parse_concept_toml("c", f'token = "sks"\nmethods = ["lora"]\n[{section}]\n{setting}\n')


def test_a_lora_rank_wider_than_the_base_models_layers_is_refused_before_training(embedded_model_dir):
    """Issue 28, point 6: the bound from the model's shapes (its config on the meta device, no weights read)."""
    from assets_pipeline.models.resolve import resolve_base_model
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import TrainingInputError
    from assets_pipeline.training.methods.lora import LoraConfig, narrowest_layer

    ref = resolve_base_model("embedded", embedded_model_dir.parents[1])
    method = get_method("lora")
    name, width = narrowest_layer(ref, ("to_q", "to_k", "to_v", "to_out.0"))
    assert 0 < width < 3072 and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    method.check_model(ref, LoraConfig(rank=width), "c")  # the widest rank that means something
    with pytest.raises(TrainingInputError, match=rf"c/concept.toml \[lora\]: rank = {width + 1} is wider than the "
                                                 rf"narrowest layer it adapts in base model 'embedded' \(.*, width "
                                                 rf"{width}\).*use rank in 1\.\.{width}"):
        method.check_model(ref, LoraConfig(rank=width + 1), "c")
    conv_name, conv_width = narrowest_layer(ref, (), ("conv1", "conv2", "conv_shortcut"))
    with pytest.raises(TrainingInputError, match=rf"conv_rank = {conv_width + 1} is wider.*{conv_name}"):
        method.check_model(ref, LoraConfig(conv_rank=conv_width + 1), "c")
