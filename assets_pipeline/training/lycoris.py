"""PEFT's LoHa/LoKr state dicts in the kohya/LyCORIS key format that A1111 and ComfyUI read, and back (pure).

The format, as ComfyUI's ``comfy/lora.py`` and ``comfy/weight_adapter/{loha,lokr}.py`` read it: one prefix per
network (``lora_unet_``; the text encoder ``lora_te_`` on SD 1.x/2.x, ``lora_te1_``/``lora_te2_`` on SDXL, as
kohya-ss/sd-scripts' ``networks/lora.py``; a transformer's ``lycoris_``, SimpleTuner's layout for SD 3.x and Flux
that ComfyUI's ``comfy/lora.py`` maps), the module's diffusers/transformers path with ``.`` as ``_``, then
the tensor: ``.hada_w1_a .hada_w1_b .hada_w2_a .hada_w2_b [.hada_t1 .hada_t2]`` (LoHa), ``.lokr_w1`` or
``.lokr_w1_a/_b``, ``.lokr_w2`` or ``.lokr_w2_a/_b [.lokr_t2]`` (LoKr), and ``.alpha``. PEFT's tensors have the
same names, shapes and products (its ``lokr/layer.py`` cites LyCORIS' ``modules/lokr.py``); only the scale
differs in one case, handled below.

Scale: PEFT multiplies every delta by ``alpha / r``. The readers do the same for LoHa (``alpha / rank``, the
rank read from ``hada_w1_b``), and for a LoKr module with a low-rank factor (the rank read from ``*_b``); a LoKr
module whose two factors are both full matrices has no rank in the file and the readers apply scale 1 (LyCORIS
itself sets alpha = rank then). There the scale is folded into ``lokr_w1`` and ``alpha`` is written as ``r``.
"""

from __future__ import annotations

from typing import Any

PREFIXES_SD = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
PREFIXES_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
LOKR_LOW_RANK = ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")


def kohya_module(prefix: str, module: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_..._to_q``.

    A text encoder's modules are named as in transformers' CLIP before v5 (``text_model.encoder.layers.0...``),
    the names the readers map (ComfyUI: ``lora_te_text_model_encoder_layers_{i}_self_attn_q_proj``); transformers
    5 dropped the ``text_model`` level from CLIPTextModel's module names."""
    if prefix.startswith("lora_te") and not module.startswith("text_model."):
        module = "text_model." + module
    return prefix + module.replace(".", "_")


def _split(key: str) -> tuple[str, str]:
    module, _, tensor = key.rpartition(".")
    return module, tensor


def _full_lokr(tensors: set[str]) -> bool:
    """A LoKr module whose readers apply scale 1: no low-rank factor, so the file holds no rank."""
    return not tensors & set(LOKR_LOW_RANK)


def peft_to_kohya(state_dicts: dict[str, dict[str, Any]], prefixes: dict[str, str],
                  scales: dict[str, dict[str, tuple[float, int]]]) -> dict[str, Any]:
    """The kohya/LyCORIS file's tensors from PEFT state dicts (``get_peft_model_state_dict``: keys
    ``<module>.<tensor>``, no adapter name) per network (``unet``, ``text_encoder``, ``text_encoder_2``).
    ``scales[network][module]`` is that module's PEFT ``(alpha, r)``."""
    import torch

    out: dict[str, Any] = {}
    for network, sd in state_dicts.items():
        modules: dict[str, dict[str, Any]] = {}
        for key, value in sd.items():
            module, tensor = _split(key)
            modules.setdefault(module, {})[tensor] = value
        for module, tensors in modules.items():
            alpha, r = scales[network][module]
            name = kohya_module(prefixes[network], module)
            if "lokr_w1" in tensors and _full_lokr(set(tensors)):
                tensors = {**tensors, "lokr_w1": tensors["lokr_w1"] * (alpha / r)}
                alpha = r
            for tensor, value in tensors.items():
                out[f"{name}.{tensor}"] = value.detach().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_to_peft(kohya: dict[str, Any], prefixes: dict[str, str],
                  scales: dict[str, dict[str, tuple[float, int]]]) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`peft_to_kohya`: PEFT state dicts per network, for ``set_peft_model_state_dict`` on
    networks that hold the same adapter (``scales`` names their modules: the ``_`` in a kohya name is ambiguous).
    Fails on a tensor no module claims, or a module whose alpha differs from its PEFT config's."""
    lookup = {kohya_module(prefixes[network], module): (network, module)
              for network, modules in scales.items() for module in modules}
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in kohya.items():
        name, tensor = _split(key)
        if name not in lookup:
            raise KeyError(f"{key}: no module of the adapter's networks is named {name!r} (prefixes {prefixes})")
        grouped.setdefault(name, {})[tensor] = value
    out: dict[str, dict[str, Any]] = {network: {} for network in scales}
    for name, tensors in grouped.items():
        network, module = lookup[name]
        alpha, r = scales[network][module]
        stored = float(tensors.pop("alpha"))
        if "lokr_w1" in tensors and _full_lokr(set(tensors)):
            tensors["lokr_w1"] = tensors["lokr_w1"] / (alpha / r)
            alpha = r
        if abs(stored - alpha) > 1e-6 * max(1.0, abs(alpha)):
            raise ValueError(f"{name}.alpha is {stored}, the adapter config says {alpha}")
        out[network].update({f"{module}.{tensor}": value for tensor, value in tensors.items()})
    return out
