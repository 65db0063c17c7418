"""Image helpers shared by stages: the training crop, and preview grids for asset metadata."""

from __future__ import annotations

import base64
import io
from pathlib import Path


def training_crop(img, resolution: int, center_crop: bool = True):
    """Resize the shorter side to ``resolution`` and crop to a square (center, or top-left when not centered),
    as diffusers' training scripts do with ``transforms.Resize`` + ``CenterCrop``/``RandomCrop``. Latents and
    control images use the same crop, so they stay pixel-aligned."""
    from PIL import Image

    img = img.convert("RGB")
    scale = resolution / min(img.size)
    w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = ((w - resolution) // 2, (h - resolution) // 2) if center_crop else (0, 0)
    return img.crop((left, top, left + resolution, top + resolution))


def grid_markdown(paths: list[str], captions: list[str] | None = None, thumb: int = 96, columns: int = 6,
                  thumb_cache=None) -> str:
    """A small contact sheet as an inline PNG in Markdown, for the Dagster UI's metadata panel.

    ``thumb_cache`` (an ItemCache) keeps thumbnails of content-addressed files (whose names are their content
    keys), so a rebuild does not re-open every full-size photo just to draw the preview.
    """
    from PIL import Image, ImageOps

    from assets_pipeline.hashing import digest

    if not paths:
        return "_no images_"
    rows = (len(paths) + columns - 1) // columns
    sheet = Image.new("RGB", (thumb * min(columns, len(paths)), thumb * rows), "white")
    for i, p in enumerate(paths):
        def make(tmp, p=p):
            ImageOps.fit(Image.open(p).convert("RGB"), (thumb, thumb)).save(tmp, format="PNG")

        if thumb_cache is not None:
            tile = Image.open(thumb_cache.get_or_create(digest("thumb", Path(p).name, thumb), make))
        else:
            tile = ImageOps.fit(Image.open(p).convert("RGB"), (thumb, thumb))
        sheet.paste(tile, ((i % columns) * thumb, (i // columns) * thumb))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    md = f"![preview](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
    if captions:
        md += "\n\n" + "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions[:12]))
    return md
