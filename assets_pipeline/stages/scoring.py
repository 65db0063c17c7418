"""CLIP scoring: the open_clip cosine similarity between each photo and its caption, and the quality subset.

Selection (all overridable per concept in ``[scoring]``): a threshold on the score — LAION-400M kept pairs with
ViT-B/32 cosine >= 0.28 (Schuhmann et al. 2021) — and/or the top fraction by score (DataComp's best CLIP filter
kept ~30%, Gadre et al. 2023). With no setting, a pretrained scorer applies LAION's 0.28; the embedded
random-weight scorer keeps everything, since its scores carry no meaning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from assets_pipeline.concept import config_section
from assets_pipeline.hashing import digest
from assets_pipeline.parallel import prefetched
from assets_pipeline.store import ItemCache, atomic_dir

LAION_THRESHOLD = 0.28
EMBEDDED_CLIP_NAME = "embedded-tiny-clip-v1"
# A CLIP with SD's tokenizer/context but tiny towers; same JSON shape as open_clip's model_configs/*.json.
EMBEDDED_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@config_section("scoring")
@dataclass(frozen=True)
class ScoringConfig:
    min_score: float | None = field(default=None, metadata={"help": "Keep photos scoring at least this."})
    top_fraction: float | None = field(default=None, metadata={"help": "Keep this fraction, best first."})
    min_keep: int = field(default=1, metadata={"help": "Never keep fewer than this many (best first)."})
    batch_size: int = field(default=16, metadata={"help": "Images per scorer forward pass."})

    def __post_init__(self) -> None:
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.min_score is not None and not -1 <= self.min_score <= 1:
            raise ValueError(f"min_score is a cosine similarity in [-1, 1], got {self.min_score}")


def ensure_embedded_clip(base_models_dir: Path) -> Path:
    """Build the tiny random open_clip model once, deterministically, as an open_clip ``local-dir:`` folder."""
    target = base_models_dir / EMBEDDED_CLIP_NAME
    if (target / "open_clip_model.safetensors").is_file():
        return target
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = CLIP(**EMBEDDED_CLIP_CONFIG)
    with atomic_dir(target) as tmp:
        (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": EMBEDDED_CLIP_CONFIG}, indent=2))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "open_clip_model.safetensors")
    return target


class ClipScorer:
    """open_clip model + preprocessing + tokenizer. ``model_name`` is an open_clip name ('ViT-B-32' with a
    local ``pretrained`` checkpoint file) or 'local-dir:/path' (config + weights in one folder)."""

    def __init__(self, model_name: str, pretrained: str | None, fingerprint: str, is_random: bool, device="cpu"):
        self.model_name, self.pretrained, self.device = model_name, pretrained, device
        self.fingerprint = fingerprint
        self.is_random = is_random
        self._loaded = None

    def load(self) -> None:
        self._parts()

    def _parts(self):
        """(model, preprocess, tokenizer), loaded on first use: a run with every score cached loads nothing."""
        if self._loaded is None:
            import open_clip

            from assets_pipeline.models.load import resolve_device

            self.device = resolve_device(self.device)
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name, pretrained=self.pretrained, device=self.device
            )
            self._loaded = (model.eval(), preprocess, open_clip.get_tokenizer(self.model_name))
        return self._loaded

    def pixels(self, image):
        """The model's input for one PIL image (open_clip's preprocessing: resize, center crop, normalize);
        thread-safe once loaded (:func:`score_images` runs it on a thread pool)."""
        return self._parts()[1](image)

    def embed_pixels(self, x) -> np.ndarray:
        """Normalized image embeddings of a batch of :meth:`pixels`."""
        import torch

        with torch.inference_mode():
            f = self._parts()[0].encode_image(x.to(self.device))
            return torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()

    def embed_images(self, images: list) -> np.ndarray:
        import torch

        return self.embed_pixels(torch.stack([self.pixels(im) for im in images]))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            model, _, tokenizer = self._parts()
            f = model.encode_text(tokenizer(texts).to(self.device))
            return torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()

    def score(self, images: list, texts: list[str]) -> np.ndarray:
        """Cosine similarity of each (image, text) pair (CLIPScore without its 2.5 weight; Hessel et al. 2021)."""
        return (self.embed_images(images) * self.embed_texts(texts)).sum(axis=1)

    def score_pixels(self, x, texts: list[str]) -> np.ndarray:
        """:meth:`score` of a batch already preprocessed (:meth:`pixels`)."""
        return (self.embed_pixels(x) * self.embed_texts(texts)).sum(axis=1)


def load_clip_scorer(model_name: str, pretrained: str | None, artifact_root: Path, device: str = "cpu") -> ClipScorer:
    """'embedded' (built once under the artifact root), 'local-dir:/path', or an open_clip name + local weights."""
    from assets_pipeline.models.embedded import EMBEDDED
    from assets_pipeline.models.resolve import cached_fingerprint

    memo = artifact_root / "base_models" / ".fingerprints"
    if model_name == EMBEDDED:
        folder = ensure_embedded_clip(artifact_root / "base_models")
        return ClipScorer(f"local-dir:{folder}", None, cached_fingerprint(folder, memo), True, device)
    if model_name.startswith("local-dir:"):
        fp = cached_fingerprint(Path(model_name.removeprefix("local-dir:")), memo)
    elif pretrained:
        fp = digest(model_name, cached_fingerprint(Path(pretrained), memo))
    else:
        raise ValueError(
            f"CLIP scorer {model_name!r} needs `pretrained` (a local checkpoint file): weights are never "
            "downloaded at run time"
        )
    return ClipScorer(model_name, pretrained, fp, False, device)


def score_images(filtered: pd.DataFrame, scorer: ClipScorer, cache: ItemCache, cfg: ScoringConfig) -> pd.DataFrame:
    """Score the kept photos against their captions (cached per image, caption and scorer) and mark the subset."""
    from PIL import Image

    df = filtered[filtered["kept"]].reset_index(drop=True).drop(columns=["kept", "reason"])
    keys = [digest("clip-score", sha, cap, scorer.fingerprint) for sha, cap in zip(df["image_sha256"], df["caption"])]
    missing = set(cache.split(keys))
    todo = [i for i, k in enumerate(keys) if k in missing]
    batches = [todo[start : start + cfg.batch_size] for start in range(0, len(todo), cfg.batch_size)]
    paths, captions = df["decoded_path"].tolist(), df["caption"].tolist()

    def load(i: int):  # decoding and preprocessing on a thread pool (assets_pipeline/parallel.py)
        with Image.open(paths[i]) as img:
            return scorer.pixels(img.convert("RGB"))

    if batches:  # a run with every score cached imports no model library
        import torch

        scorer.load()  # on this thread, before the pool's threads preprocess with it
    for idx, pixels in zip(batches, prefetched(batches, load)):
        scores = scorer.score_pixels(torch.stack(pixels), [captions[i] for i in idx])
        for i, s in zip(idx, scores):
            cache.put(keys[i], lambda tmp, s=float(s): Path(tmp).write_text(json.dumps(s)))
    df["clip_score"] = [json.loads(cache.path(k).read_text()) for k in keys]
    df["in_subset"], df["reason"] = select_subset(df["clip_score"].to_numpy(), cfg, scorer.is_random)
    return df


def select_subset(scores: np.ndarray, cfg: ScoringConfig, scorer_is_random: bool) -> tuple[list[bool], list[str]]:
    n = len(scores)
    min_score = cfg.min_score
    if min_score is None and cfg.top_fraction is None and not scorer_is_random:
        min_score = LAION_THRESHOLD
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    keep_top = n if cfg.top_fraction is None else math.ceil(cfg.top_fraction * n)
    keep, reasons = [], []
    for i in range(n):
        why = []
        if min_score is not None and scores[i] < min_score:
            why.append(f"CLIP score {scores[i]:.3f} < {min_score}")
        if rank[i] >= keep_top:
            why.append(f"rank {rank[i] + 1} outside the top {cfg.top_fraction:.0%} ({keep_top} of {n})")
        if why and rank[i] < cfg.min_keep:
            why = []  # min_keep: the best few always stay, so a concept is never emptied by scoring alone
        keep.append(not why)
        reasons.append("; ".join(why))
    return keep, reasons
