"""Textual inversion (Gal et al. 2022): one new token embedding learned, everything else frozen.

The placeholder ``<{token}>`` is added to the tokenizer, initialized from the class noun's embedding, and is
the only row of the embedding matrix that changes (all others are restored after every step, as in diffusers'
examples/textual_inversion/textual_inversion.py, whose lr 5e-4 is the default here). Saved as
``learned_embeds.safetensors`` ({placeholder: [1, dim]}, diffusers' format, ``pipe.load_textual_inversion``)
and ``<concept>.safetensors`` ({"emb_params": [1, dim]}, A1111's embeddings folder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from assets_pipeline.training.config import TrainConfig
from assets_pipeline.training.methods import register
from assets_pipeline.training.methods.base import (
    Method, Models, TrainContext, encode_text, reject_text_time_family,
)

DIFFUSERS_FILE = "learned_embeds.safetensors"


@dataclass(frozen=True)
class TextualInversionConfig(TrainConfig):
    learning_rate: float = field(default=5e-4, metadata={"help": "diffusers' textual-inversion default."})
    initializer_token: str | None = field(default=None, metadata={"help": "Word to start from; None = class noun."})


def placeholder(ctx: TrainContext) -> str:
    return f"<{ctx.token}>"


class TextualInversionMethod(Method):
    name = "textual_inversion"
    asset_name = "textual_inversion_embedding"
    config_cls = TextualInversionConfig

    def needs_text_encoder(self, cfg) -> bool:
        return True

    def check_inputs(self, ctx: TrainContext, cfg) -> None:
        # SDXL needs the token in both tokenizers and both encoders (train_textual_inversion_sdxl.py): not ported.
        reject_text_time_family("textual inversion", ctx)
        super().check_inputs(ctx, cfg)

    def training_caption(self, caption: str, ctx: TrainContext) -> str:
        pattern = rf"(?<!\S){re.escape(ctx.token)}(?!\S)"
        if re.search(pattern, caption):
            return re.sub(pattern, placeholder(ctx), caption)
        return f"a photo of {placeholder(ctx)}, {caption}"

    def prepare(self, models: Models, cfg: TextualInversionConfig, ctx: TrainContext) -> list[str]:
        import torch

        tok, te = models.tokenizer, models.text_encoder
        if tok.add_tokens(placeholder(ctx)) != 1:
            raise ValueError(f"the tokenizer already has {placeholder(ctx)!r}; choose another token")
        init_word = cfg.initializer_token or ctx.class_noun or "photo"
        init_ids = tok.encode(init_word, add_special_tokens=False)
        te.resize_token_embeddings(len(tok), mean_resizing=False)  # the new row is set just below
        self.placeholder_id = tok.convert_tokens_to_ids(placeholder(ctx))
        emb = te.get_input_embeddings().weight
        with torch.no_grad():
            emb[self.placeholder_id] = emb[init_ids].mean(dim=0)  # a multi-token word starts from its mean
        te.requires_grad_(False)
        te.get_input_embeddings().requires_grad_(True)
        self.original = emb.detach().clone()
        self.keep = torch.ones(emb.shape[0], 1, dtype=torch.bool)  # every row but the placeholder's is restored
        self.keep[self.placeholder_id] = False
        return ["text_encoder"]

    def encode(self, models: Models, batch):
        return encode_text(models, batch)

    def after_step(self, models: Models) -> None:
        import torch

        emb = models.text_encoder.get_input_embeddings().weight
        if self.original.device != emb.device or self.original.dtype != emb.dtype:  # once, not every step
            self.original = self.original.to(emb.device, emb.dtype)
            self.keep = self.keep.to(emb.device)
        with torch.no_grad():  # a where, not boolean indexing: no host sync
            emb.copy_(torch.where(self.keep, self.original, emb))

    def save(self, models: Models, load_base, out_dir: Path, cfg, ctx: TrainContext):
        from safetensors.torch import save_file

        learned = models.text_encoder.get_input_embeddings().weight[self.placeholder_id].detach().float().cpu()[None]
        save_file({placeholder(ctx): learned.contiguous()}, str(out_dir / DIFFUSERS_FILE))
        a1111 = out_dir / f"{ctx.concept}.safetensors"
        save_file({"emb_params": learned.contiguous()}, str(a1111))
        return [out_dir / DIFFUSERS_FILE, a1111]

    def load_pipeline(self, load_base, out_dir: Path, ctx: TrainContext):
        pipe = load_base()
        pipe.load_textual_inversion(str(out_dir / DIFFUSERS_FILE), token=placeholder(ctx))
        return pipe

    def validation_prompt(self, ctx: TrainContext) -> str:
        return f"a photo of {placeholder(ctx)} {ctx.class_noun}".strip()


register(TextualInversionMethod())
