"""Textual inversion (Gal et al. 2022): one new token embedding learned, everything else frozen.

The placeholder ``<{token}>`` is added to the tokenizer, initialized from the class noun's embedding, and is
the only row of the embedding matrix that changes (all others are restored after every step, as in diffusers'
examples/textual_inversion/textual_inversion.py, whose lr 5e-4 is the default here). Saved as
``learned_embeds.safetensors`` ({placeholder: [1, dim]}, diffusers' format, ``pipe.load_textual_inversion``)
and ``<concept>.safetensors`` ({"emb_params": [1, dim]}, A1111's embeddings folder).

SDXL (diffusers' examples/textual_inversion/textual_inversion_sdxl.py): the token is added to both tokenizers and
a row is learned in both text encoders; prompts are re-encoded every step as the latents cache encodes them
(``base.encode_text``), pooled embedding included. Saved as ``learned_embeds.safetensors`` and
``learned_embeds_2.safetensors`` (that script's files, one per encoder) and ``<concept>.safetensors`` with the rows
under ``clip_l`` and ``clip_g`` (the SDXL embedding format A1111 and ComfyUI read; diffusers loads each row with
``load_textual_inversion(state_dict["clip_l"], token=..., text_encoder=pipe.text_encoder,
tokenizer=pipe.tokenizer)`` and ``clip_g`` likewise into ``text_encoder_2``/``tokenizer_2``).

SD 3.x and Flux: the token in each CLIP encoder and in T5, as the pivotal tuning of diffusers'
train_dreambooth_lora_flux_advanced.py learns it (there beside a LoRA; here alone), every encoder re-encoding the
prompts each step; ``<concept>.safetensors`` holds a row per encoder (``clip_l``, ``clip_g``, ``t5``; that script's
keys). Flux's pipeline loads each row with ``load_textual_inversion`` as SDXL's does; SD 3.x's has no
textual-inversion loader, so :func:`add_token_row` (the README's few lines) adds each row to its tokenizer and
encoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from assets_pipeline.training.config import TrainConfig
from assets_pipeline.training.methods.registry import register
from assets_pipeline.training.methods.base import Method, Models, TrainContext, encode_text

DIFFUSERS_FILE = "learned_embeds.safetensors"


def diffusers_file(index: int) -> str:
    """The file of the ``index``-th text encoder's row, as textual_inversion_sdxl.py names them."""
    return DIFFUSERS_FILE if index == 0 else f"learned_embeds_{index + 1}.safetensors"


@dataclass(frozen=True)
class TextualInversionConfig(TrainConfig):
    learning_rate: float = field(default=5e-4, metadata={"help": "diffusers' textual-inversion default."})
    initializer_token: str | None = field(default=None, metadata={"help": "Word to start from; None = class noun."})


def placeholder(ctx: TrainContext) -> str:
    return f"<{ctx.token}>"


class TextualInversionMethod(Method):
    """Textual inversion (Gal et al. 2022): one new word, `<token>`, learned as an embedding row in each text
    encoder; the base model itself is frozen. Prompt with `<token>`. Output (a few KB):
    `learned_embeds.safetensors` (one per text encoder), which loads with `pipe.load_textual_inversion(file)`,
    and `<concept>.safetensors` for A1111's and ComfyUI's embeddings folders."""
    name = "textual_inversion"
    asset_name = "textual_inversion_embedding"
    config_cls = TextualInversionConfig

    def needs_text_encoder(self, cfg) -> bool:
        return True

    def training_caption(self, caption: str, ctx: TrainContext) -> str:
        pattern = rf"(?<!\S){re.escape(ctx.token)}(?!\S)"
        if re.search(pattern, caption):
            return re.sub(pattern, placeholder(ctx), caption)
        return f"a photo of {placeholder(ctx)}, {caption}"

    def prepare(self, models: Models, cfg: TextualInversionConfig, ctx: TrainContext) -> list[str]:
        import torch

        # Every text encoder of the family (SDXL's two) gets the token and its own row; rows are kept per encoder.
        self.encoders = models.family.text_encoder_names
        self.placeholder_ids, self.original, self.keep = {}, {}, {}
        for spec, te, tok in zip(models.family.text_encoders, models.text_encoders, models.tokenizers):
            te_name = spec.component
            if tok.add_tokens(placeholder(ctx)) != 1:
                raise ValueError(f"the {spec.tokenizer} already has {placeholder(ctx)!r}; choose another token")
            init_word = cfg.initializer_token or ctx.class_noun or "photo"
            init_ids = tok.encode(init_word, add_special_tokens=False)
            # The new row is set just below. Never fewer rows than the encoder has: T5's embedding is padded past
            # its tokenizer (32128 rows for 32100 tokens), and its new token takes one of those spare rows.
            te.resize_token_embeddings(max(len(tok), te.get_input_embeddings().num_embeddings), mean_resizing=False)
            placeholder_id = tok.convert_tokens_to_ids(placeholder(ctx))
            emb = te.get_input_embeddings().weight
            with torch.no_grad():
                emb[placeholder_id] = emb[init_ids].mean(dim=0)  # a multi-token word starts from its mean
            te.requires_grad_(False)
            te.get_input_embeddings().requires_grad_(True)
            self.placeholder_ids[te_name] = placeholder_id
            self.original[te_name] = emb.detach().clone()
            keep = torch.ones(emb.shape[0], 1, dtype=torch.bool)  # every row but the placeholder's is restored
            keep[placeholder_id] = False
            self.keep[te_name] = keep
        return list(self.encoders)

    def encode(self, models: Models, batch):
        return encode_text(models, batch)

    def after_step(self, models: Models) -> None:
        import torch

        for te_name in self.encoders:
            emb = models.network(te_name).get_input_embeddings().weight
            original = self.original[te_name]
            if original.device != emb.device or original.dtype != emb.dtype:  # once, not every step
                self.original[te_name] = original = original.to(emb.device, emb.dtype)
                self.keep[te_name] = self.keep[te_name].to(emb.device)
            with torch.no_grad():  # a where, not boolean indexing: no host sync
                emb.copy_(torch.where(self.keep[te_name], original, emb))

    def _learned(self, models: Models, te_name: str):
        weight = models.network(te_name).get_input_embeddings().weight
        return weight[self.placeholder_ids[te_name]].detach().float().cpu()[None].contiguous()

    def save(self, models: Models, load_base, out_dir: Path, cfg, ctx: TrainContext):
        from safetensors.torch import save_file

        files, combined = [], {}
        for i, spec in enumerate(models.family.text_encoders):
            learned = self._learned(models, spec.component)
            save_file({placeholder(ctx): learned}, str(out_dir / diffusers_file(i)))
            files.append(out_dir / diffusers_file(i))
            combined[spec.embedding_key] = learned
        a1111 = out_dir / f"{ctx.concept}.safetensors"
        # One encoder: A1111's SD 1.x/2.x key; several: one row per encoder (SDXL's clip_l/clip_g file).
        save_file({"emb_params": combined[models.family.text_encoders[0].embedding_key]} if len(combined) == 1
                  else combined, str(a1111))
        return [*files, a1111]

    def load_pipeline(self, load_base, out_dir: Path, ctx: TrainContext):
        pipe = load_base()
        encoders = ctx.model_family.text_encoders
        if len(encoders) == 1:
            pipe.load_textual_inversion(str(out_dir / DIFFUSERS_FILE), token=placeholder(ctx))
            return pipe
        from safetensors.torch import load_file

        rows = load_file(str(out_dir / f"{ctx.concept}.safetensors"))
        for spec in encoders:
            tokenizer, encoder = getattr(pipe, spec.tokenizer), getattr(pipe, spec.component)
            if hasattr(pipe, "load_textual_inversion"):  # SDXL's, Flux's: diffusers' loader, per encoder
                pipe.load_textual_inversion(rows[spec.embedding_key], token=placeholder(ctx), text_encoder=encoder,
                                            tokenizer=tokenizer)
            else:  # SD 3.x's pipeline has no loader: what the README shows
                add_token_row(tokenizer, encoder, placeholder(ctx), rows[spec.embedding_key])
        return pipe

    def validation_prompt(self, ctx: TrainContext) -> str:
        return f"a photo of {placeholder(ctx)} {ctx.class_noun}".strip()


def add_token_row(tokenizer, text_encoder, token: str, row) -> None:
    """Add ``token`` to ``tokenizer`` with the embedding ``row`` ([1, dim]) in ``text_encoder``: what
    ``load_textual_inversion`` does, for a pipeline without it (StableDiffusion3Pipeline), shown in the README."""
    import torch

    if tokenizer.add_tokens(token) != 1:
        raise ValueError(f"the tokenizer already has {token!r}")
    rows = text_encoder.get_input_embeddings().num_embeddings
    text_encoder.resize_token_embeddings(max(len(tokenizer), rows), mean_resizing=False)
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[tokenizer.convert_tokens_to_ids(token)] = row.reshape(-1).to(weight.device, weight.dtype)


register(TextualInversionMethod())
