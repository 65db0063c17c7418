"""A Flux LoRA in the kohya-ss sd-scripts layout (``lora_unet_double_blocks_*`` / ``lora_unet_single_blocks_*``), the
file ComfyUI, Forge and kohya's own tools read for Flux.1 (pure: state dicts in, state dict out).

Black Forest Labs' transformer fuses projections that diffusers keeps apart: a double block's image and text
``qkv`` (diffusers' ``attn.to_q/to_k/to_v`` and ``attn.add_q_proj/...``), a single block's ``linear1`` (its
``attn.to_q/to_k/to_v`` and ``proj_mlp``). One LoRA on a fused projection is written exactly as its parts' LoRAs
side by side: ``lora_down`` stacks their ``lora_A`` (rank: the parts' rank times their number) and ``lora_up`` is
block-diagonal (each part's ``lora_B`` in its own rows and rank columns; zero blocks for a part that has no LoRA,
e.g. ``proj_mlp`` with the default targets), so ``up @ down`` is each part's ``B @ A`` in its rows. ``alpha`` is written so the
readers' scale ``alpha / rank`` equals PEFT's ``alpha / r`` per part. diffusers'
``_convert_kohya_flux_lora_to_diffusers`` recognises the block-diagonal layout (its "sparse" case) and splits it
back into the parts' own LoRAs; ``tests/test_flow.py`` checks the round trip through it.

The key names are those of diffusers' converter (``lora_conversion_utils.py``, ``_convert_sd_scripts_to_ai_toolkit``)
and of kohya-ss sd-scripts ``networks/lora_flux.py`` (``lora_unet_`` + the BFL module path with ``_``).
"""

from __future__ import annotations

from typing import Any

# kohya module (after lora_unet_{double,single}_blocks_{i}_) -> the diffusers modules it fuses, in row order.
DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}


def _fused_modules(modules: set[str]) -> dict[str, tuple[str, ...]]:
    """kohya module name -> the full diffusers module paths it fuses, for every fused module that one of
    ``modules`` (diffusers paths with a LoRA) belongs to."""
    out: dict[str, tuple[str, ...]] = {}
    for module in modules:
        if module == "proj_out":  # the transformer's last projection: BFL's final_layer.linear
            out["lora_unet_final_layer_linear"] = ("proj_out",)
            continue
        parts = module.split(".")
        if len(parts) < 3 or parts[0] not in ("transformer_blocks", "single_transformer_blocks"):
            raise ValueError(f"{module}: a LoRA outside Flux's transformer blocks (and its final proj_out) has no "
                             "kohya name here (train the blocks' projections: the default targets)")
        i, local = parts[1], ".".join(parts[2:])
        table, kind = (DOUBLE, "double") if parts[0] == "transformer_blocks" else (SINGLE, "single")
        name = next((k for k, members in table.items() if local in members), None)
        if name is None:
            raise ValueError(f"{module}: no {kind}-block projection of Flux's original layout is made of "
                             f"{local!r} (kohya modules: {sorted(table)})")
        out[f"lora_unet_{kind}_blocks_{i}_{name}"] = tuple(f"{parts[0]}.{i}.{m}" for m in table[name])
    return out


def flux_lora_to_kohya(state_dict: dict[str, Any], scales: dict[str, float],
                       out_features: dict[str, int]) -> dict[str, Any]:
    """The kohya file's tensors from a PEFT LoRA state dict of ``FluxTransformer2DModel`` (keys
    ``<module>.lora_A.weight`` / ``.lora_B.weight``, as ``get_peft_model_state_dict`` gives them). ``scales``:
    each module's PEFT scale ``alpha / r``; ``out_features``: each fused part's output width (the transformer's
    ``nn.Linear.out_features``), for the zero rows of a part without a LoRA."""
    import torch

    lora: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        module, _, tensor = key.removesuffix(".weight").rpartition(".")
        if tensor not in ("lora_A", "lora_B"):
            raise ValueError(f"{key}: not a plain LoRA tensor (lora_A/lora_B); the kohya file holds LoRA only")
        lora.setdefault(module, {})[tensor] = value
    out: dict[str, Any] = {}
    for name, members in sorted(_fused_modules(set(lora)).items()):
        present = [m for m in members if m in lora]
        ranks = {lora[m]["lora_A"].shape[0] for m in present}
        scale = {scales[m] for m in present}
        if len(ranks) > 1 or len(scale) > 1:
            raise ValueError(f"{name}: its parts {present} have different LoRA ranks {sorted(ranks)} or scales "
                             f"{sorted(scale)}; one fused LoRA has one rank per part and one alpha")
        r, ref = ranks.pop(), lora[present[0]]["lora_A"]
        # Every part gets r rows of down and its own r columns of up (zeros for a part without a LoRA): equal blocks,
        # the layout diffusers' converter splits back exactly.
        down = torch.cat([lora[m]["lora_A"] if m in lora else torch.zeros_like(ref) for m in members])
        up = ref.new_zeros(sum(out_features[m] for m in members), r * len(members))
        row = 0
        for k, m in enumerate(members):
            if m in lora:
                up[row : row + out_features[m], k * r : (k + 1) * r] = lora[m]["lora_B"]
            row += out_features[m]
        s = scale.pop()
        if name == "lora_unet_final_layer_linear":  # diffusers' converter drops this module's alpha: the scale
            up, s = up * s, 1.0                      # goes into up, and alpha = rank reads the same everywhere
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(s * r * len(members), dtype=ref.dtype)
    return out
