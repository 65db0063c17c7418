"""How a prompt becomes the denoiser's text conditioning, per kind of family (the rows of ``families.py`` name
one of these). Token ids come from :func:`tokenize`, one tensor per tokenizer in the family's order; ``encode``
returns ``(prompt_embeds, pooled_prompt_embeds)``, the pooled one None where the family has none.

Each follows its pipeline's ``encode_prompt`` and the matching diffusers training script: SDXL's
``examples/dreambooth/train_dreambooth_lora_sdxl.py``, SD 3.x's ``train_dreambooth_lora_sd3.py`` and Flux's
``train_dreambooth_lora_flux.py`` (``encode_prompt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def tokenize(tokenizers: Sequence[Any], prompts: list[str], max_lengths: Sequence[int | None] = ()) -> list[Any]:
    """Token ids for each tokenizer, padded to its full length (``max_lengths[i]`` where given, e.g. a T5 encoder's
    ``max_sequence_length``; else the tokenizer's ``model_max_length``), as diffusers' training scripts tokenize."""
    lengths = list(max_lengths) + [None] * (len(tokenizers) - len(max_lengths))
    return [tok(prompts, padding="max_length", max_length=length or tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok, length in zip(tokenizers, lengths)]


class LastHiddenState:
    """SD 1.x/2.x: the one text encoder's ``last_hidden_state`` [B, 77, dim]; no pooled embedding. The token ids
    must be on the encoder's device already (the trainer keeps them there)."""

    pooled = False

    def encode(self, text_encoders: Sequence[Any], token_ids: Sequence[Any]):
        return text_encoders[0](token_ids[0])[0], None


class PenultimateConcat:
    """SDXL: each encoder's penultimate hidden states (``hidden_states[-2]``), concatenated along the feature axis
    (768 + 1280 = 2048 for SDXL base), and the last encoder's projected pooled embedding
    (``CLIPTextModelWithProjection`` output ``[0]``, ``text_embeds``), as ``StableDiffusionXLPipeline.encode_prompt``
    gives them with clip_skip None."""

    pooled = True

    def encode(self, text_encoders: Sequence[Any], token_ids: Sequence[Any]):
        import torch

        if len(text_encoders) != len(token_ids):
            raise ValueError(f"{len(text_encoders)} text encoders but {len(token_ids)} token-id tensors")
        hidden, pooled = [], None
        for encoder, ids in zip(text_encoders, token_ids):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        if pooled is None or pooled.ndim != 2:
            shape = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"the last text encoder must return a pooled (batch, dim) embedding first, as "
                             f"CLIPTextModelWithProjection does; got shape {shape}")
        return torch.cat(hidden, dim=-1), pooled


class ClipPooledT5:
    """Flux.1: the CLIP-L encoder's pooled output (``pooler_output``) and the T5 encoder's last hidden state
    [B, max_sequence_length, 4096] as the token embeddings (``FluxPipeline.encode_prompt``; diffusers'
    train_dreambooth_lora_flux.py ``encode_prompt``)."""

    pooled = True

    def encode(self, text_encoders: Sequence[Any], token_ids: Sequence[Any]):
        clip, t5 = text_encoders
        pooled = clip(token_ids[0].to(clip.device), output_hidden_states=False).pooler_output
        return t5(token_ids[1].to(t5.device))[0], pooled


class TwoClipsAndT5:
    """SD 3.x: CLIP-L's and CLIP-G's penultimate hidden states side by side, zero-padded to the T5 width, then the
    T5 encoder's last hidden state appended along the sequence [B, 77 + max_sequence_length, 4096]; the pooled
    embedding is both CLIPs' projected outputs side by side [B, 2048] (``StableDiffusion3Pipeline.encode_prompt``
    with clip_skip None; diffusers' train_dreambooth_lora_sd3.py ``encode_prompt``)."""

    pooled = True

    def encode(self, text_encoders: Sequence[Any], token_ids: Sequence[Any]):
        import torch
        import torch.nn.functional as F

        *clips, t5 = text_encoders
        hidden, pooled = [], []
        for encoder, ids in zip(clips, token_ids):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5_embeds = t5(token_ids[-1].to(t5.device))[0]
        clip_embeds = torch.cat(hidden, dim=-1)
        clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        return torch.cat([clip_embeds, t5_embeds], dim=-2), torch.cat(pooled, dim=-1)
