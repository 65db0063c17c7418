"""Ingest: every file of a concept folder becomes a manifest row (a decoded RGB image) or a reject with a reason.

Sample identity is the sha256 of the file's bytes. Decoded images (EXIF-transposed, RGB) go to a
content-addressed cache, so re-ingesting the same photo decodes nothing. The source folder is only read.

The concept's ``control/`` folder is never read as photos: it holds ControlNet conditioning images brought by the
user, each paired with the photo of the same path without its extension (``control/<photo stem>.<any image
extension>``, as kohya's ControlNet training pairs them). Each pair is checked here; a pair that cannot be used is
a reject with its reason (no photo, two for one photo, unreadable, byte-identical to its photo, another aspect
ratio), and the valid ones are the ``pairs`` table (stages/conditioning.py crops each as its photo).
"""

from __future__ import annotations

import errno
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from assets_pipeline.hashing import digest, sha256_bytes
from assets_pipeline.parallel import image_threads, thread_map
from assets_pipeline.concept import SPEC_FILE
from assets_pipeline.store import ItemCache, NotRegularFile, read_regular_file, special_kind

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_SUFFIX = ".txt"
# Bump when decoding changes what is written for the same bytes (pixels or the text chunks; not the PNG
# compression, which changes no value read back): it is part of every decoded-image cache key.
DECODER_VERSION = 2
# zlib level of the decoded PNGs. Level 1 instead of Pillow's 6: encoding a 4 MP photo takes a third of the time
# (the costliest part of ingesting one), files are about a third larger, and every later stage decodes them faster.
PNG_COMPRESS_LEVEL = 1

MANIFEST_COLUMNS = [
    "image_sha256", "source_path", "format", "source_mode", "width", "height", "file_bytes",
    "exif_orientation", "decoded_path", "sidecar_caption",
]
REJECT_COLUMNS = ["source_path", "code", "reason"]
CONTROL_DIR = "control"  # a concept's own conditioning images (ControlNet), paired with its photos by path
PAIR_COLUMNS = ["image_sha256", "source_path", "control_sha256", "control_source_path", "control_width",
                "control_height", "control_decoded_path"]


@dataclass(frozen=True)
class IngestConfig:
    max_pixels: int = field(
        default=100_000_000,
        metadata={"help": "Images with more pixels are rejected before decoding (decompression-bomb guard)."},
    )
    max_file_bytes: int = field(default=200 * 1024 * 1024, metadata={"help": "Larger files are rejected unread."})
    max_caption_chars: int = field(default=2000, metadata={"help": (
        "Longer sidecar captions are rejected (the photo gets a generated caption). SD's text encoder reads 77 "
        "tokens (~300 characters of English); long tag lists reach ~1000. A caption travels in every table, "
        "materialization event and lineage manifest, so a 10 MB one would bloat all of them.")})

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_file_bytes <= 0 or self.max_caption_chars <= 0:
            raise ValueError("max_pixels, max_file_bytes and max_caption_chars must be positive")


@dataclass(frozen=True)
class PairRules:
    """How ``control/`` is read (from the concept's ``[control]``: stages/conditioning.py ControlConfig)."""

    use: bool = True  # False: conditioning images are made by an annotator; control/'s files are rejects, unread
    max_aspect_difference: float = 0.02  # relative difference of width/height between a pair and its photo


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    rejects: pd.DataFrame
    cache_counts: dict[str, int]
    pairs: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PAIR_COLUMNS))


class RejectedFile(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def decode_image(data: bytes, cfg: IngestConfig):
    """Decode bytes to an RGB PIL image; raise :class:`RejectedFile` with a specific reason otherwise.

    Handles EXIF orientation, CMYK, 16-bit and float grayscale, palette/alpha transparency (composited on white,
    since SD trains on RGB), and multi-frame files (first frame).
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > cfg.max_pixels:
                raise RejectedFile("pixel_limit", f"over the pixel limit: {w}x{h} = {w * h:,} px > {cfg.max_pixels:,}")
            img.load()
    except RejectedFile:
        raise
    except Image.DecompressionBombError as e:
        raise RejectedFile("pixel_limit", f"over the pixel limit: {e}") from None
    except UnidentifiedImageError:
        raise RejectedFile("not_image", "not an image: no known image format in the file's bytes") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RejectedFile("truncated", f"truncated or corrupt image data: {e}") from None
    fmt, mode = img.format or "unknown", img.mode
    orientation = int(img.getexif().get(0x0112, 1) or 1)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB"), fmt, mode, orientation


def _read_caption(path: Path, max_chars: int) -> str:
    try:
        data = _read_bytes(path, 4 * max_chars)  # UTF-8 takes at most 4 bytes a character: larger is too long
    except RejectedFile as e:
        if e.code != "file_too_large":
            raise
        raise RejectedFile("caption_too_long", f"caption too long: {path.stat().st_size:,} bytes > {max_chars:,} "
                           "characters; the image gets a generated caption instead") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RejectedFile(
            "unreadable_caption",
            f"unreadable caption: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "the image gets a generated caption instead",
        ) from None
    text = " ".join(text.split())
    if len(text) > max_chars:
        raise RejectedFile("caption_too_long", f"caption too long: {len(text):,} characters > {max_chars:,}; "
                           "the image gets a generated caption instead")
    return text


def _read_bytes(path: Path, max_bytes: int | None = None) -> bytes:
    """The file's bytes, or a reject: too large (checked before reading), not a regular file (a FIFO, socket or
    device: never opened), a symbolic link loop, or unreadable (a dangling link, a file removed mid-scan, one we
    may not read)."""
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise RejectedFile("file_too_large", f"file too large: {size:,} bytes > {max_bytes:,}")
        return read_regular_file(path)  # a FIFO, socket or device raises NotRegularFile, unopened
    except NotRegularFile as e:
        raise _not_regular(e.kind) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_loop(e) from None
        raise RejectedFile("unreadable", f"cannot read the file: {e.strerror or e}") from None


def _not_regular(kind: str) -> RejectedFile:
    return RejectedFile("special_file", f"{kind}, not a regular file: not opened; photos and captions must be "
                        "regular files")


def _link_loop(e: OSError) -> RejectedFile:
    return RejectedFile("symlink_loop", f"symbolic link loop ({e.strerror}): not read; point the link at a photo or "
                        "remove it")


def shown_name(rel: Path) -> str:
    """A relative path as text: itself where its name is valid UTF-8; else its bytes as ``\\xff`` escapes (a name
    the file system decoded with surrogate escapes cannot be stored in a table or JSON)."""
    return os.fsencode(rel.as_posix()).decode("utf-8", "backslashreplace")


def _walk(concept_dir: Path):
    """Every entry under the concept folder, depth first, without following directory links."""
    for dirpath, dirnames, filenames in os.walk(concept_dir, followlinks=False):
        dirnames.sort()
        for d in list(dirnames):
            if (Path(dirpath) / d).is_symlink():
                dirnames.remove(d)
                yield Path(dirpath) / d
        for f in sorted(filenames):
            yield Path(dirpath) / f


def _decoded_info(cache: ItemCache, key: str, data: bytes, cfg: IngestConfig) -> dict:
    """Decode into the cache once; on a hit read what the manifest needs from the PNG's header and text chunks,
    so re-ingesting a large, unchanged folder costs a hash per photo, not a decode."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if cache.split([key]):
        img, fmt, mode, orientation = decode_image(data, cfg)
        meta = PngInfo()
        for k, v in (("source_format", fmt), ("source_mode", mode), ("exif_orientation", str(orientation))):
            meta.add_text(k, v)
        cache.put(key, lambda tmp: img.save(tmp, format="PNG", pnginfo=meta, compress_level=PNG_COMPRESS_LEVEL))
        w, h = img.size
    else:
        with Image.open(cache.path(key)) as png:  # header and the text chunks before the pixels; no decode
            (w, h), text = png.size, png.info
        fmt, mode, orientation = text["source_format"], text["source_mode"], int(text["exif_orientation"])
        if w * h > cfg.max_pixels:
            raise RejectedFile("pixel_limit", f"over the pixel limit: {w}x{h} = {w * h:,} px > {cfg.max_pixels:,}")
    return {"format": fmt, "source_mode": mode, "width": w, "height": h, "exif_orientation": orientation}


def ingest_concept(
    concept_dir: Path, data_root: Path, image_cache: ItemCache, cfg: IngestConfig = IngestConfig(),
    pairs: PairRules = PairRules(),
) -> IngestResult:
    root = data_root.resolve()
    rows: list[dict] = []
    rejects: list[dict] = []
    seen: dict[str, str] = {}
    image_files: list[Path] = []
    control_files: list[Path] = []
    captions: dict[Path, str] = {}

    def reject(path: Path, code: str, reason: str) -> None:
        rejects.append({"source_path": shown_name(path.relative_to(concept_dir)), "code": code, "reason": reason})

    for path in _walk(concept_dir):
        rel = path.relative_to(concept_dir)
        if rel.as_posix() == SPEC_FILE:
            continue
        if shown_name(rel) != rel.as_posix():  # tables, lineage and captions need text: such a name has none
            reject(path, "name_not_utf8", "the file name is not valid UTF-8 (shown with its bytes escaped): not "
                   "read; rename it, e.g. with convmv -f <its encoding> -t utf-8 --notest")
            continue
        try:  # what the entry is, links followed; nothing is opened before it is known to be a regular file
            mode = os.stat(path).st_mode
        except OSError as e:
            if e.errno == errno.ELOOP:
                r = _link_loop(e)
                reject(path, r.code, r.reason)
                continue
            mode = None  # a dangling link, or removed meanwhile: reading it says why
        real = path.resolve()
        if not real.is_relative_to(root):
            reject(path, "outside_data_root", f"outside the data root: links to {real}; not read")
            continue
        if path.is_dir():
            reject(path, "linked_folder", "linked folder not followed; move the photos into the concept folder")
            continue
        if any(part.startswith(".") for part in rel.parts):
            reject(path, "hidden", "hidden file, ignored")
            continue
        if mode is not None and (kind := special_kind(mode)):
            r = _not_regular(kind)
            reject(path, r.code, r.reason)
            continue
        suffix = path.suffix.lower()
        if rel.parts[0] == CONTROL_DIR and len(rel.parts) > 1:  # conditioning images, never photos
            if suffix in IMAGE_SUFFIXES:
                control_files.append(path)
            else:
                reject(path, "unsupported_type", f"{CONTROL_DIR}/ holds conditioning images, one per photo "
                       f"({CONTROL_DIR}/<photo name>.<image extension>); {suffix or '(no extension)'!r} is not one "
                       f"of {sorted(IMAGE_SUFFIXES)}")
        elif suffix == CAPTION_SUFFIX:
            try:
                captions[path.with_suffix("")] = _read_caption(path, cfg.max_caption_chars)
            except RejectedFile as e:
                reject(path, e.code, e.reason)
        elif suffix in IMAGE_SUFFIXES:
            image_files.append(path)
        else:
            reject(path, "unsupported_type", f"unsupported file type {suffix or '(no extension)'!r}; "
                   f"photos must be one of {sorted(IMAGE_SUFFIXES)}")

    image_stems = {p.with_suffix("") for p in image_files}
    for stem in sorted(set(captions) - image_stems):
        reject(stem.with_suffix(CAPTION_SUFFIX), "orphan_caption", "caption file without a photo of the same name")

    def read(path: Path) -> tuple[bytes, str] | RejectedFile:
        try:
            data = _read_bytes(path, cfg.max_file_bytes)
        except RejectedFile as e:  # this file's reason, reported with the others; not an error of the run
            return e
        return data, sha256_bytes(data)

    def decoded_key(sha: str) -> str:
        return digest("decoded-image", sha, DECODER_VERSION)

    def decode(item: tuple[str, bytes]) -> dict | RejectedFile:
        sha, data = item
        try:
            return _decoded_info(image_cache, decoded_key(sha), data, cfg)
        except RejectedFile as e:
            return e

    # Reading, hashing and decoding run on a thread pool (assets_pipeline/parallel.py), a chunk of files at a time
    # (so only a chunk's bytes are in memory), each distinct content decoded once; the rows are then made in the
    # folder's order, so the manifest is the same whatever the number of threads.
    outcome: dict[str, dict | RejectedFile] = {}  # by content: what the manifest needs, or why it was rejected
    chunk = 4 * image_threads()
    for start in range(0, len(image_files), chunk):
        paths = image_files[start : start + chunk]
        reads = thread_map(read, paths)
        new = {r[1]: r[0] for r in reads if not isinstance(r, RejectedFile) and r[1] not in outcome}
        outcome.update(zip(new, thread_map(decode, list(new.items()))))
        for path, r in zip(paths, reads):
            if isinstance(r, RejectedFile):
                reject(path, r.code, r.reason)
                continue
            data, sha = r
            info = outcome[sha]
            if isinstance(info, RejectedFile):  # every copy of rejected bytes gets their reason
                reject(path, info.code, info.reason)
                continue
            rel = path.relative_to(concept_dir).as_posix()
            if sha in seen:
                reject(path, "exact_duplicate", f"exact duplicate of {seen[sha]} (same bytes)")
                continue
            seen[sha] = rel
            rows.append({
                "image_sha256": sha, "source_path": rel, **info, "file_bytes": len(data),
                "decoded_path": str(image_cache.path(decoded_key(sha))),
                "sidecar_caption": captions.get(path.with_suffix("")),
            })
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    paired = _pairs(control_files, concept_dir, rows, pairs, read, decode, outcome,
                    lambda sha: image_cache.path(decoded_key(sha)), reject)
    return IngestResult(
        manifest=manifest.sort_values("source_path", ignore_index=True),
        rejects=pd.DataFrame(rejects, columns=REJECT_COLUMNS).sort_values("source_path", ignore_index=True),
        cache_counts=image_cache.counts(),
        pairs=pd.DataFrame(paired, columns=PAIR_COLUMNS).sort_values("source_path", ignore_index=True),
    )


def _pairs(files: list[Path], concept_dir: Path, rows: list[dict], rules: PairRules, read, decode, outcome: dict,
           decoded_path, reject) -> list[dict]:
    """The valid pairs among ``control/``'s image ``files`` (rows of PAIR_COLUMNS); every other one rejected with
    why. A pair is ``control/<photo path without extension>.<ext>`` for an ingested photo (a manifest row)."""
    if not files:
        return []
    control = concept_dir / CONTROL_DIR
    if not rules.use:
        for path in files:
            reject(path, "control_not_used", "[control] source = 'annotator': conditioning images are made from the "
                   f"photos, {CONTROL_DIR}/ is not read (source = 'folder' or 'auto' reads it)")
        return []
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.relative_to(control).with_suffix("").as_posix(), []).append(path)
    photos = {Path(r["source_path"]).with_suffix("").as_posix(): r for r in rows}
    out = []
    for stem, paths in sorted(by_stem.items()):
        if len(paths) > 1:
            names = ", ".join(p.relative_to(concept_dir).as_posix() for p in paths)
            for path in paths:
                reject(path, "control_duplicate", f"{len(paths)} conditioning images for the photo {stem}.*: {names}; "
                       "keep one")
            continue
        path, photo = paths[0], photos.get(stem)
        if photo is None:
            reject(path, "control_without_photo", f"no photo {stem}.<image extension> was ingested for it (missing, "
                   f"or rejected: see its own reject); a conditioning image is named as its photo, in {CONTROL_DIR}/")
            continue
        got = read(path)
        if not isinstance(got, RejectedFile):
            data, sha = got
            if sha not in outcome:
                outcome[sha] = decode((sha, data))
            got = outcome[sha]
        if isinstance(got, RejectedFile):
            reject(path, "control_unreadable", f"conditioning image of {photo['source_path']}: {got.reason}")
            continue
        if sha == photo["image_sha256"]:
            reject(path, "control_same_as_photo", f"byte-identical to its photo {photo['source_path']}: a "
                   "conditioning image is the photo's edge map, depth map, pose or scribble, not the photo")
            continue
        photo_ratio, ratio = photo["width"] / photo["height"], got["width"] / got["height"]
        if abs(ratio / photo_ratio - 1) > rules.max_aspect_difference:
            reject(path, "control_aspect_mismatch", f"{got['width']}x{got['height']} (width/height {ratio:.3f}), its "
                   f"photo {photo['source_path']} {photo['width']}x{photo['height']} ({photo_ratio:.3f}): they differ "
                   f"by {abs(ratio / photo_ratio - 1):.1%}, more than [control] max_aspect_difference = "
                   f"{rules.max_aspect_difference}: it cannot be aligned with the photo's crop")
            continue
        out.append({"image_sha256": photo["image_sha256"], "source_path": photo["source_path"],
                    "control_sha256": sha, "control_source_path": path.relative_to(concept_dir).as_posix(),
                    "control_width": got["width"], "control_height": got["height"],
                    "control_decoded_path": str(decoded_path(sha))})
    return out


def restore_decoded(manifest: pd.DataFrame, concept_dir: Path, image_cache: ItemCache,
                    cfg: IngestConfig = IngestConfig()) -> list[str]:
    """Check each row's decoded image against its integrity digest; re-decode a missing or corrupt one from its
    photo, which must still hold the bytes the row was made from. Returns the paths restored.

    Every stage after ``raw_images`` reads the decoded images (and links them into its imagefolder), so each
    calls this first: a cache entry damaged since ``raw_images`` ran is rebuilt rather than read or spread.
    """
    rows = list(manifest.itertuples())
    keys = []
    for r in rows:
        decoded = Path(r.decoded_path)
        keys.append(decoded.name.removesuffix(image_cache.ext))
        if decoded != image_cache.path(keys[-1]):
            raise ValueError(f"{decoded}: not an entry of the image cache {image_cache.path(keys[-1]).parent.parent}")
    # The digests are checked on the image threads (hashing releases the GIL); the rare restores, one by one.
    bad = thread_map(lambda key: bool(image_cache.split([key])), keys)
    restored = []
    for r, key, is_bad in zip(rows, keys, bad):
        if not is_bad:
            continue
        decoded = Path(r.decoded_path)
        source = concept_dir / r.source_path
        try:
            data, why = _read_bytes(source, cfg.max_file_bytes), "has changed"
        except RejectedFile as e:
            data, why = None, f"cannot be read ({e.reason})"
        if data is None or sha256_bytes(data) != r.image_sha256:
            raise ValueError(f"{decoded}: decoded image missing or corrupt, and its photo {source} {why} since "
                             "raw_images ran; rematerialize raw_images for this concept")
        _decoded_info(image_cache, key, data, cfg)
        restored.append(str(decoded))
    return restored
