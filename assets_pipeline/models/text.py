"""How a prompt becomes the denoiser's text conditioning, per kind of family (the rows of ``families.py`` name
one of these). Token ids come from :func:`tokenize`, one tensor per tokenizer in the family's order; ``encode``
returns ``(prompt_embeds, pooled_prompt_embeds)``, the pooled one None where the family has none.

The SDXL encoding follows diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and
``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (``encode_prompt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def tokenize(tokenizers: Sequence[Any], prompts: list[str]) -> list[Any]:
    """Token ids for each tokenizer, padded to its full length, as the SD/SDXL training scripts tokenize."""
    return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in tokenizers]


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
