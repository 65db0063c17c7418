"""Image helpers shared by stages: preview grids for asset metadata (the training crop is stages/buckets.py)."""

from __future__ import annotations

import base64
import io
from pathlib import Path


def grid_markdown(paths: list[str], captions: list[str] | None = None, thumb: int = 96, columns: int = 6,
                  thumb_cache=None) -> str:
    """A small contact sheet as an inline PNG in Markdown, for the Dagster UI's metadata panel.

    ``thumb_cache`` (an ItemCache) keeps thumbnails of content-addressed files (whose names are their content
    keys), so a rebuild does not re-open every full-size photo just to draw the preview.
    """
    from PIL import Image, ImageOps

    from assets_pipeline.hashing import digest
    from assets_pipeline.parallel import thread_map

    if not paths:
        return "_no images_"

    def fit(p: str):
        with Image.open(p) as img:
            return ImageOps.fit(img.convert("RGB"), (thumb, thumb))

    def tile(p: str):  # on the image threads (assets_pipeline/parallel.py): each decodes a full-size photo
        if thumb_cache is None:
            return fit(p)
        path = thumb_cache.get_or_create(digest("thumb", Path(p).name, thumb),
                                         lambda tmp: fit(p).save(tmp, format="PNG"))
        with Image.open(path) as img:
            return img.convert("RGB")

    rows = (len(paths) + columns - 1) // columns
    sheet = Image.new("RGB", (thumb * min(columns, len(paths)), thumb * rows), "white")
    unique = list(dict.fromkeys(paths))  # one thread per thumbnail cache key (parallel.py)
    tiles = dict(zip(unique, thread_map(tile, unique)))
    for i, p in enumerate(paths):
        sheet.paste(tiles[p], ((i % columns) * thumb, (i // columns) * thumb))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    md = f"![preview](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
    if captions:
        md += "\n\n" + "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions[:12]))
    return md


def image_markdown(img, alt: str, max_side: int | None = None, jpeg_quality: int | None = None) -> str:
    """An image inline in Markdown (a data URI), which the Dagster UI shows in the metadata panel.

    ``jpeg_quality`` for photographic content (validation renders): a fraction of the PNG's size in the event
    log; PNG (lossless) for plots and text.
    """
    from PIL import Image

    if isinstance(img, (str, Path)):
        with Image.open(img) as f:
            img = f.convert("RGB")
    if max_side and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    if jpeg_quality:
        img.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality)
        mime = "jpeg"
    else:
        img.save(buf, format="PNG", optimize=True)
        mime = "png"
    return f"![{alt}](data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()})"


def labeled_grid(rows: list[tuple[str, list[tuple[str, object]]]], tile: int = 256):
    """One image a person can read: for each row a title line (e.g. the prompt), then its images side by side
    with a label under each (e.g. "base, seed 0" | "trained, seed 0"). Images are scaled to ``tile`` pixels
    (nearest-neighbour when enlarged, so a 64 px render stays sharp rather than blurred)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(12, tile // 16))
    pad, line = 8, max(12, tile // 16) + 8
    columns = max(len(cells) for _, cells in rows)
    width = pad + columns * (tile + pad)
    height = sum(line + tile + line + pad for _ in rows) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for title, cells in rows:
        draw.text((pad, y), _fit(draw, title, font, width - 2 * pad), fill="black", font=font)
        y += line
        for i, (label, img) in enumerate(cells):
            x = pad + i * (tile + pad)
            resample = Image.Resampling.NEAREST if max(img.size) < tile else Image.Resampling.LANCZOS
            sheet.paste(img.convert("RGB").resize((tile, tile), resample), (x, y))
            draw.text((x, y + tile + 2), _fit(draw, label, font, tile), fill="dimgray", font=font)
        y += tile + line + pad
    return sheet


def _fit(draw, text: str, font, width: int) -> str:
    """``text``, shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
