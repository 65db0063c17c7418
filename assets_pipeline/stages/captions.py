"""Captions: sidecar .txt (the user's words) > a captioner model (BLIP, local weights) > the template.

Model captions are cached by (image sha256, captioner fingerprint). The concept's identifier must reach the
text encoder, so a model caption is prefixed with the template ("a photo of sks dog, <model caption>").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd

from assets_pipeline.concept import ConceptSpec, config_section
from assets_pipeline.hashing import digest
from assets_pipeline.store import ItemCache

CAPTION_COLUMNS = ["image_sha256", "source_path", "decoded_path", "caption", "caption_source", "has_token"]
OVERLONG_COLUMNS = ["source_path", "caption_source", "tokens", "cut"]


class Captioner(Protocol):
    fingerprint: str

    def caption(self, images: list) -> list[str]: ...


@config_section("captions")
@dataclass(frozen=True)
class CaptionConfig:
    use_captioner: bool = field(default=True, metadata={"help": "Caption photos without a sidecar by model."})
    batch_size: int = field(default=8, metadata={"help": "Images per captioner forward pass."})
    max_new_tokens: int = field(default=30, metadata={"help": "Longest model caption, in tokens."})


class BlipCaptioner:
    """BLIP image captioning through transformers (e.g. Salesforce/blip-image-captioning-base saved locally)."""

    def __init__(self, model_path: str, fingerprint: str, device: str = "cpu", max_new_tokens: int = 30):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from assets_pipeline.models.load import resolve_device

        device = resolve_device(device)
        self.processor = BlipProcessor.from_pretrained(model_path, local_files_only=True)
        self.model = BlipForConditionalGeneration.from_pretrained(model_path, local_files_only=True).to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.fingerprint = digest("blip", fingerprint, max_new_tokens)

    def caption(self, images: list) -> list[str]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def caption_images(
    manifest: pd.DataFrame,
    spec: ConceptSpec,
    cache: ItemCache,
    captioner: Captioner | None = None,
    cfg: CaptionConfig = CaptionConfig(),
) -> pd.DataFrame:
    from PIL import Image

    template = spec.instance_prompt()
    rows = []
    todo: list[tuple[int, str, str]] = []  # (row index, cache key, decoded path)
    for _, r in manifest.iterrows():
        row = {k: r[k] for k in ("image_sha256", "source_path", "decoded_path")}
        if isinstance(r["sidecar_caption"], str) and r["sidecar_caption"]:
            row.update(caption=r["sidecar_caption"], caption_source="sidecar")
        elif captioner is not None and cfg.use_captioner:
            key = digest("caption", r["image_sha256"], captioner.fingerprint)
            row.update(caption=None, caption_source="model")
            todo.append((len(rows), key, r["decoded_path"]))
        else:
            row.update(caption=template, caption_source="template")
        rows.append(row)

    if todo:
        missing = set(cache.split([k for _, k, _ in todo]))
        pending = [t for t in todo if t[1] in missing]
        for start in range(0, len(pending), cfg.batch_size):
            batch = pending[start : start + cfg.batch_size]
            texts = captioner.caption([Image.open(p).convert("RGB") for _, _, p in batch])
            for (_, key, _), text in zip(batch, texts):
                cache.put(key, lambda tmp, t=text: Path(tmp).write_text(t, encoding="utf-8"))
        for i, key, _ in todo:
            model_text = cache.path(key).read_text(encoding="utf-8")
            rows[i]["caption"] = f"{template}, {model_text}" if model_text else template

    df = pd.DataFrame(rows, columns=CAPTION_COLUMNS[:-1])
    df["has_token"] = df["caption"].str.split().apply(lambda words: spec.token in words)
    return df[CAPTION_COLUMNS]


def overlong_captions(captions: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """The captions the text encoder truncates: more ``tokens`` (start and end tokens included, as the encoder
    reads them) than ``tokenizer.model_max_length`` (77 for SD's CLIP), with ``cut``, the words past the limit
    that it never sees. Nothing fails on such a caption: the latents stage and diffusers' training scripts
    tokenize with ``truncation=True``, so the tail is dropped without a word."""
    limit = tokenizer.model_max_length
    if captions.empty:  # a tokenizer refuses an empty batch
        return pd.DataFrame(columns=OVERLONG_COLUMNS)
    # verbose=False: transformers' own "longer than the maximum" warning names no file; ours does.
    ids = tokenizer(list(captions["caption"]), truncation=False, verbose=False).input_ids
    rows = [{"source_path": r.source_path, "caption_source": r.caption_source, "tokens": len(i),
             "cut": tokenizer.decode(i[limit - 1 : -1])}
            for r, i in zip(captions.itertuples(), ids) if len(i) > limit]
    return pd.DataFrame(rows, columns=OVERLONG_COLUMNS)
