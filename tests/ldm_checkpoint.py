"""Save a diffusers SD 1.x pipeline as one original-layout (CompVis/LDM) checkpoint, for single-file tests.

diffusers 0.42 ships only the LDM -> diffusers direction (``diffusers.loaders.single_file_utils``); the reverse
script (``scripts/convert_diffusers_to_original_stable_diffusion.py``) lives in the diffusers repository, not in the
wheel, and hard-codes SD 1.x's four U-Net levels. This module inverts the installed loader's own key mapping
(``DIFFUSERS_TO_LDM_MAPPING`` plus the block arithmetic of ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint`` and ``convert_ldm_clip_checkpoint``) for any depth, so the tiny pipeline can be
written in the layout ``StableDiffusionPipeline.from_single_file`` reads.
"""

from __future__ import annotations

import re

from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_UNET_RESNET[layer]}.{tail}"


def unet_to_ldm(sd: dict, config) -> dict:
    per_level = config["layers_per_block"] + 1  # resnets per level, plus the down/upsampler slot
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    out = {}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i = int(m[1]) * per_level + int(m[3]) + 1
            name = f"{i}.0.{_unet_resnet(m[4])}" if m[2] == "resnets" else f"{i}.1.{m[4]}"
            out[f"input_blocks.{name}"] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"] = value
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"middle_block.{2 * int(m[1])}.{_unet_resnet(m[2])}"] = value
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            out[f"middle_block.1.{m[1]}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i = int(m[1]) * per_level + int(m[3])
            name = f"{i}.0.{_unet_resnet(m[4])}" if m[2] == "resnets" else f"{i}.1.{m[4]}"
            out[f"output_blocks.{name}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(m[1])
            slot = 2 if any(k.startswith(f"up_blocks.{level}.attentions.") for k in sd) else 1
            out[f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{m[2]}"] = value
        else:
            raise KeyError(f"no LDM name for U-Net key {key!r}")
    return {LDM_UNET_KEY + k: v for k, v in out.items()}


def vae_to_ldm(sd: dict, config) -> dict:
    levels = len(config["up_block_types"])
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    out = {}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[f"encoder.down.{m[1]}.downsample.conv.{m[2]}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):  # LDM counts up from 0
            level = levels - 1 - int(m[1])
            out[f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            out[f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
            conv = value[:, :, None, None] if value.ndim == 2 else value
            out[f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"] = conv
        else:
            raise KeyError(f"no LDM name for VAE key {key!r}")
    return {"first_stage_model." + k: v for k, v in out.items()}


def text_encoder_to_ldm(sd: dict) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` prefix); the LDM layout keeps it.
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else f"text_model.{k}"): v
            for k, v in sd.items()}


def pipeline_to_ldm_state_dict(pipe) -> dict:
    sd = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
          **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
          **text_encoder_to_ldm(pipe.text_encoder.state_dict())}
    return {k: v.contiguous() for k, v in sd.items()}
