"""Packed LoRA (training/packing.py) against PEFT's own LoRA: per-row outputs and per-concept gradients equal solo
training's, on one linear layer and on the embedded tiny SD U-Net with the project's LoRA config."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from assets_pipeline.training.packing import (
    PackedLoraLinear,
    adapter_parameters,
    adapter_state,
    inject_packed_lora,
    load_adapter_state,
    rows,
)

# PEFT warns when a second adapter is injected into a model that has one: the point here.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")

ALPHAS = (4.0, 8.0, 2.0)  # rank 4: scalings 1, 2, 0.5
RANK = 4


class Tiny(nn.Module):
    def __init__(self, d_in: int = 16, d_out: int = 12) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def peft_three_adapters(seed: int = 0):
    """A Tiny whose ``proj`` carries PEFT LoRA adapters c0, c1, c2 (rank 4, ALPHAS), A and B random non-zero."""
    import peft

    torch.manual_seed(seed)
    model = Tiny()
    model.requires_grad_(False)
    for k, alpha in enumerate(ALPHAS):
        peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=alpha, target_modules=["proj"]), model,
                                     adapter_name=f"c{k}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return model


def peft_adapter_state(model, k: int) -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=f"c{k}")


def row_losses(out, target):
    return ((out - target) ** 2).mean(dim=list(range(1, out.ndim)))


def packed_like(solo):
    """A Tiny whose proj is packed with the three adapters of ``solo`` (peft_three_adapters) over its base."""
    packed = Tiny()
    packed.proj.load_state_dict(solo.proj.base_layer.state_dict())
    inject_packed_lora(packed, ["proj"], 3, RANK, ALPHAS)
    for k in range(3):
        load_adapter_state(packed, k, peft_adapter_state(solo, k))
    return packed


def per_concept_mean(losses, index, n):
    """The pack's loss: the sum over concepts of each concept's own mean row loss."""
    return sum(losses[index == k].mean() for k in range(n) if (index == k).any())


def test_packed_linear_equals_peft_row_by_row_and_each_adapters_gradient_equals_its_solo_mean():
    solo = peft_three_adapters()
    packed = packed_like(solo)
    index = torch.tensor([0, 2, 1, 0, 2, 0, 1])
    x, target = torch.randn(7, 3, 16), torch.randn(7, 3, 12)

    with rows(packed, index):
        out = packed(x)
        per_concept_mean(row_losses(out, target), index, 3).backward()
    layer = packed.proj
    assert isinstance(layer, PackedLoraLinear)
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    for k in range(3):
        solo.proj.set_adapter(f"c{k}")
        mine = index == k
        expected = solo(x[mine])
        torch.testing.assert_close(out[mine], expected, atol=1e-6, rtol=0)
        # The adapters differ enough that a row through the wrong adapter would fail the comparison above.
        other = packed_out_with(packed, x[mine], (k + 1) % 3)
        assert (other - expected).abs().max() > 1e-2
        row_losses(expected, target[mine]).mean().backward()
        torch.testing.assert_close(layer.lora_A[k].grad, solo.proj.lora_A[f"c{k}"].weight.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora_B[k].grad, solo.proj.lora_B[f"c{k}"].weight.grad, atol=1e-6, rtol=0)
        assert layer.lora_A[k].grad.abs().max() > 1e-3  # a real gradient, not two zeros agreeing


def packed_out_with(packed, x, k):
    with torch.no_grad(), rows(packed, [k] * len(x)):
        return packed(x)


def test_a_row_of_index_minus_one_is_the_base_alone_and_trains_no_adapter():
    solo = peft_three_adapters()
    packed = packed_like(solo)
    x = torch.randn(3, 16)
    with rows(packed, [-1, 1, -1]):
        out = packed(x)
        out[[0, 2]].sum().backward()
    torch.testing.assert_close(out[[0, 2]], solo.proj.base_layer(x[[0, 2]]), atol=1e-6, rtol=0)
    assert (out[1] - solo.proj.base_layer(x[1])).abs().max() > 1e-2  # row 1 does get its adapter
    assert all(float(p.grad.abs().max()) == 0 for p in adapter_parameters(packed, 1))
    # Adapters without rows take part too: zero gradients, not None (the pack trainer must not step them).
    assert all(p.grad is not None and float(p.grad.abs().max()) == 0 for k in (0, 2)
               for p in adapter_parameters(packed, k))


# -- the embedded tiny SD U-Net with the project's own solo LoRA ------------------------------------------------------

N_ROWS = (0, 2, 1, 0, 2)


@pytest.fixture(scope="module")
def unets(embedded_model_dir):
    """(base U-Net, the 3 solo LoRA U-Nets, their PEFT state dicts): each solo adapter made as LoraMethod.prepare
    makes it, from its own seed, then its lora_B perturbed away from zero (as after some training)."""
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    from assets_pipeline.models.families import get_family
    from assets_pipeline.training.methods import get_method
    from assets_pipeline.training.methods.base import Models

    base = UNet2DConditionModel.from_pretrained(embedded_model_dir, subfolder="unet")
    lora = get_method("lora")
    solos, states = [], []
    for k, alpha in enumerate(ALPHAS):
        torch.manual_seed(100 + k)  # the solo trainer's set_seed(cfg.seed) before prepare
        models = Models(family=get_family("sd1"), denoiser=copy.deepcopy(base), noise_scheduler=None)
        assert lora.prepare(models, lora.config_cls(rank=RANK, alpha=alpha), None) == ["unet"]
        with torch.no_grad():
            for name, p in models.denoiser.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        solos.append(models.denoiser)
        states.append(get_peft_model_state_dict(models.denoiser))
    return base, solos, states


def packed_unet(base, states):
    from assets_pipeline.models.families import get_family

    unet = copy.deepcopy(base)
    inject_packed_lora(unet, get_family("sd1").denoiser.lora_targets, 3, RANK, ALPHAS)
    for k, state in enumerate(states):
        load_adapter_state(unet, k, state)
    return unet


def unet_inputs(unet, n: int):
    g = torch.Generator().manual_seed(7)
    size = unet.config.sample_size
    latents, timesteps = torch.randn(n, 4, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g)
    embeds = torch.randn(n, 77, unet.config.cross_attention_dim, generator=g)
    return latents, timesteps, embeds, torch.randn(n, 4, size, size, generator=g)


def solo_grads(unet) -> dict:
    """A solo U-Net's LoRA gradients under get_peft_model_state_dict's keys."""
    return {name.replace(".default", ""): p.grad for name, p in unet.named_parameters() if "lora_" in name}


def test_packed_unet_equals_each_solo_lora_unet_row_by_row_in_output_and_gradient(unets):
    from assets_pipeline.training.step import per_sample_mse

    base, solos, states = unets
    unet = packed_unet(base, states)
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == 3 * sum(
        p.numel() for p in solos[0].parameters() if p.requires_grad)
    index = torch.tensor(N_ROWS)
    latents, timesteps, embeds, target = unet_inputs(base, len(index))
    with rows(unet, index):
        pred = unet(latents, timesteps, encoder_hidden_states=embeds).sample
        per_concept_mean(per_sample_mse(pred, target), index, 3).backward()
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora_" not in n)
    for k, solo in enumerate(solos):
        mine = index == k
        expected = solo(latents[mine], timesteps[mine], encoder_hidden_states=embeds[mine]).sample
        torch.testing.assert_close(pred[mine], expected, atol=1e-5, rtol=0)
        per_sample_mse(expected, target[mine]).mean().backward()
        packed_grads = {key: p.grad for key, p in zip(adapter_state(unet, k), adapter_parameters(unet, k))}
        expected_grads = solo_grads(solo)
        assert packed_grads.keys() == expected_grads.keys()
        for key, grad in expected_grads.items():
            assert grad.abs().max() > 0, key
            torch.testing.assert_close(packed_grads[key], grad, atol=1e-5, rtol=1e-4, msg=key)
    # The concepts' predictions differ (their adapters matter): a swapped index would fail the comparison above.
    with torch.no_grad(), rows(unet, [1] * len(index)):
        swapped = unet(latents, timesteps, encoder_hidden_states=embeds).sample
    assert (swapped[index == 0] - pred[index == 0]).abs().max() > 1e-3


def test_adapter_state_round_trips_the_solo_peft_state_dict(unets):
    base, _, states = unets
    unet = packed_unet(base, states)
    for k, state in enumerate(states):
        mine = adapter_state(unet, k)
        assert list(mine) == list(state)
        for key, tensor in state.items():
            assert mine[key].dtype == tensor.dtype and torch.equal(mine[key], tensor), key
    assert not torch.equal(adapter_state(unet, 0)[next(iter(states[0]))], states[1][next(iter(states[1]))])


def test_with_gradient_checkpointing_the_rows_context_spans_backward(unets):
    """diffusers' checkpointing is non-reentrant: the blocks run again in backward(), reading the row index."""
    base, _, states = unets
    index = torch.tensor(N_ROWS)
    latents, timesteps, embeds, target = unet_inputs(base, len(index))
    grads = []
    for checkpointing in (False, True):
        unet = packed_unet(base, states)
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        with rows(unet, index):
            loss = ((unet(latents, timesteps, encoder_hidden_states=embeds).sample - target) ** 2).mean()
            loss.backward()
        grads.append([p.grad for p in adapter_parameters(unet, 2)])
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, atol=1e-6, rtol=1e-5)
    with rows(unet, index):
        loss = ((unet(latents, timesteps, encoder_hidden_states=embeds).sample - target) ** 2).mean()
    with pytest.raises(RuntimeError, match="no row index is set"):
        loss.backward()


# -- errors ------------------------------------------------------------------------------------------------------------

def packed_tiny() -> nn.Module:
    model = Tiny()
    inject_packed_lora(model, ["proj"], 3, RANK, ALPHAS)
    return model


def test_a_forward_without_a_row_index_says_how_to_set_one():
    model = packed_tiny()
    with pytest.raises(RuntimeError, match=r"packed LoRA layer 'proj': no row index is set; run the model inside "
                                           r"`with rows\(model, index\):`"):
        model(torch.randn(2, 16))
    with rows(model, [0, 1]):
        model(torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="no row index is set"):  # cleared on leaving the block
        model(torch.randn(2, 16))


def test_a_row_index_of_another_length_than_the_batch_names_both():
    model = packed_tiny()
    with rows(model, [0, 1, 2]), pytest.raises(RuntimeError, match="the row index has 3 entries but the input has "
                                                                    "5 rows"):
        model(torch.randn(5, 16))


def test_a_row_index_out_of_range_is_refused_when_set():
    model = packed_tiny()
    with pytest.raises(ValueError, match=r"adapter numbers 0\.\.2 \(or -1"), rows(model, [0, 3]):
        pass
    with pytest.raises(ValueError, match="1-D integer tensor"), rows(model, torch.zeros(2)):
        pass


def test_an_adapter_state_with_missing_or_extra_keys_or_other_shapes_names_them():
    solo = peft_three_adapters()
    model = packed_tiny()
    state = peft_adapter_state(solo, 0)
    assert set(state) == {"proj.lora_A.weight", "proj.lora_B.weight"}
    missing = {k: v for k, v in state.items() if k != "proj.lora_B.weight"}
    with pytest.raises(KeyError, match=r"missing keys 1 \(\['proj.lora_B.weight'\]\), unexpected keys 0"):
        load_adapter_state(model, 0, missing)
    with pytest.raises(KeyError, match=r"missing keys 0 \(\[\]\), unexpected keys 1 \(\['proj.lora_C.weight'\]\)"):
        load_adapter_state(model, 0, {**state, "proj.lora_C.weight": state["proj.lora_A.weight"]})
    with pytest.raises(ValueError, match=r"proj.lora_A.weight: \(8, 16\), the pack's \(4, 16\)"):
        load_adapter_state(model, 0, {**state, "proj.lora_A.weight": torch.zeros(8, 16)})
    with pytest.raises(IndexError, match=r"adapter 3 does not exist: the pack has adapters 0\.\.2"):
        load_adapter_state(model, 3, state)
    assert torch.equal(model.proj.lora_B[0], torch.zeros(12, RANK))  # nothing was copied by a refused load


def test_injection_refuses_unmatched_targets_and_non_linear_modules():
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] not found"):
        inject_packed_lora(Tiny(), ["nope"], 2, RANK, 4.0)
    conv = nn.Sequential(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match=r"nn.Linear layers only.*'0 \(torch.nn.modules.conv.Conv2d\)'"):
        inject_packed_lora(conv, ["0"], 2, RANK, 4.0)
    solo = peft_three_adapters()
    # PEFT's lora.Linear is not a plain nn.Linear.
    with pytest.raises(TypeError, match=r"'proj \(peft.tuners.lora.layer.Linear\)'"):
        inject_packed_lora(solo, ["proj"], 2, RANK, 4.0)
