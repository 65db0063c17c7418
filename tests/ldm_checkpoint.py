"""Save a diffusers SD 1.x pipeline as one original-layout (CompVis/LDM) checkpoint, and an SDXL pipeline as one
SGM-layout checkpoint (Stability's generative-models repository), for single-file tests.

diffusers 0.42 ships only the LDM -> diffusers direction (``diffusers.loaders.single_file_utils``); the reverse
scripts (``scripts/convert_diffusers_to_original_stable_diffusion.py`` and ``..._sdxl.py``) live in the diffusers
repository, not in the wheel, and hard-code the published models' U-Net levels. This module inverts the installed
loader's own key mapping (``DIFFUSERS_TO_LDM_MAPPING`` plus the block arithmetic of ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``) for any
depth, so the tiny pipelines can be written in the layout ``from_single_file`` reads.
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# transformers' CLIP encoder layer -> open_clip's residual block (DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]).
_OPEN_CLIP_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_BLOCK_KEY = re.compile(
    rf"text_model\.encoder\.layers\.(\d+)\.({'|'.join(map(re.escape, _OPEN_CLIP_BLOCK))})\.(weight|bias)")
# Where SGM's conditioner keeps SDXL's two text encoders (diffusers' CHECKPOINT_KEY_NAMES "clip_sdxl" and
# "open_clip_sdxl"; LDM_CLIP_PREFIX_TO_REMOVE).
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


def _unet_resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_UNET_RESNET[layer]}.{tail}"


def unet_to_ldm(sd: dict, config) -> dict:
    per_level = config["layers_per_block"] + 1  # resnets per level, plus the down/upsampler slot
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-text + size embedding: `label_emb`
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
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


def text_encoder_to_ldm(sd: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` prefix); the LDM layout keeps it.
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()}


def open_clip_to_ldm(sd: dict, prefix: str) -> dict:
    """A ``CLIPTextModelWithProjection`` state dict in open_clip's layout (the inverse of diffusers'
    ``convert_open_clip_checkpoint``): q/k/v projections fused into ``in_proj_*``, the text projection stored
    transposed (open_clip computes ``x @ text_projection``)."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out, qkv = {}, {}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value.T if key == "text_projection.weight" else value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := _OPEN_CLIP_BLOCK_KEY.fullmatch(key):
            out[f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_BLOCK[m[2]]}.{m[3]}"] = value
        else:
            raise KeyError(f"no open_clip name for text encoder key {key!r}")
    for (layer, kind), parts in qkv.items():  # diffusers splits in_proj in q, k, v order
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm_state_dict(pipe) -> dict:
    sd = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
          **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
          **text_encoder_to_ldm(pipe.text_encoder.state_dict())}
    return {k: v.contiguous() for k, v in sd.items()}


def sdxl_pipeline_to_sgm_state_dict(pipe) -> dict:
    """An SDXL pipeline as one SGM-layout checkpoint: U-Net and VAE as in LDM, CLIP-L under
    ``conditioner.embedders.0.transformer.``, OpenCLIP-G (open_clip layout) under ``conditioner.embedders.1.model.``."""
    sd = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
          **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
          **text_encoder_to_ldm(pipe.text_encoder.state_dict(), SDXL_CLIP_L_PREFIX),
          **open_clip_to_ldm(pipe.text_encoder_2.state_dict(), SDXL_OPEN_CLIP_PREFIX)}
    return {k: v.contiguous() for k, v in sd.items()}
