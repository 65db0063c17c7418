"""stages/ingest.py: every file of a concept folder ends in the manifest or in the rejects table with a code."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from assets_pipeline.stages.ingest import IngestConfig, decode_image, ingest_concept
from assets_pipeline.store import ItemCache
from helpers import encode, mean_abs_diff, photo, snapshot, write_concept


def ingest(folder: Path, data_root: Path, cache: ItemCache, cfg: IngestConfig = IngestConfig()):
    return ingest_concept(folder, data_root, cache, cfg)


def codes(res) -> dict[str, str]:
    return dict(zip(res.rejects["source_path"], res.rejects["code"]))


def test_demo_concept_every_file_accounted_for(data_root, image_cache):
    from assets_pipeline.demo_data import write_demo_concept

    folder = write_demo_concept(data_root)
    res = ingest(folder, data_root, image_cache)
    files = {p.name for p in folder.iterdir()} - {"concept.toml"}
    used_sidecars = {Path(p).with_suffix(".txt").name
                     for p, c in zip(res.manifest["source_path"], res.manifest["sidecar_caption"])
                     if isinstance(c, str)}
    assert set(res.manifest["source_path"]) | set(res.rejects["source_path"]) | used_sidecars == files
    assert not set(res.manifest["source_path"]) & set(res.rejects["source_path"])
    # What demo_data.py says each bad file is for.
    assert codes(res) == {
        "coffee_copy.png": "exact_duplicate",
        "notes.jpg": "not_image",
        "rocket.txt": "unreadable_caption",
        "truncated.jpg": "truncated",
    }
    assert res.rejects["reason"].str.len().gt(0).all()
    for path, sha in zip(res.manifest["source_path"], res.manifest["image_sha256"]):
        assert sha == hashlib.sha256((folder / path).read_bytes()).hexdigest()


def test_ingest_leaves_source_folder_untouched(data_root, image_cache):
    from assets_pipeline.demo_data import write_demo_concept

    folder = write_demo_concept(data_root)
    before = snapshot(folder)
    ingest(folder, data_root, image_cache)
    assert snapshot(folder) == before


def test_reingest_decodes_nothing(data_root, tmp_path):
    folder = write_concept(data_root, "c", {"a.png": encode(photo("coffee", (96, 64)), "PNG"),
                                            "b.jpg": encode(photo("astronaut", (80, 80)), "JPEG")})
    first = ingest(folder, data_root, ItemCache(tmp_path / "art", "images", ".png"))
    second = ingest(folder, data_root, ItemCache(tmp_path / "art", "images", ".png"))
    assert first.cache_counts == {"items_computed": 2, "items_cached": 0}
    assert second.cache_counts == {"items_computed": 0, "items_cached": 2}
    assert first.manifest.equals(second.manifest)


# ---- bad inputs: each lands in the rejects table with its code, and never in the manifest ----------------------

GOOD = encode(photo("coffee", (96, 64)), "PNG")


def _truncated():
    data = encode(photo("rocket", (128, 96)), "JPEG", quality=90)
    return data[: len(data) // 2]


BAD_CASES = {
    # id: (files, path expected in rejects, code, ingest config)
    "truncated_jpeg": ({"bad.jpg": _truncated()}, "bad.jpg", "truncated", IngestConfig()),
    "not_an_image": ({"notes.jpg": b"meeting notes, saved as .jpg\n"}, "notes.jpg", "not_image", IngestConfig()),
    "empty_file": ({"empty.png": b""}, "empty.png", "not_image", IngestConfig()),
    "pixel_limit": ({"big.png": encode(photo("astronaut", (200, 200)), "PNG")}, "big.png", "pixel_limit",
                    IngestConfig(max_pixels=100 * 100)),
    "file_too_large": ({"big.png": encode(photo("astronaut", (200, 200)), "PNG")}, "big.png", "file_too_large",
                       IngestConfig(max_file_bytes=len(GOOD) + 1)),
    "exact_duplicate": ({"same.png": GOOD}, "same.png", "exact_duplicate", IngestConfig()),
    "unreadable_caption": ({"good.txt": b"a photo of sks dog \xff\xfe on grass"}, "good.txt", "unreadable_caption",
                           IngestConfig()),
    "orphan_caption": ({"nobody.txt": b"a photo of nothing"}, "nobody.txt", "orphan_caption", IngestConfig()),
    "unsupported_extension": ({"photo.heic": GOOD}, "photo.heic", "unsupported_type", IngestConfig()),
    "no_extension": ({"README": b"hello"}, "README", "unsupported_type", IngestConfig()),
    "hidden_file": ({".hidden.png": encode(photo("chelsea", (64, 64)), "PNG")}, ".hidden.png", "hidden",
                    IngestConfig()),
    "file_in_hidden_folder": ({".thumbs/t.png": encode(photo("chelsea", (64, 64)), "PNG")}, ".thumbs/t.png",
                              "hidden", IngestConfig()),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_rejected_with_its_code(case, data_root, image_cache):
    files, bad, code, cfg = BAD_CASES[case]
    folder = write_concept(data_root, "c", {"good.png": GOOD, **files})
    res = ingest(folder, data_root, image_cache, cfg)
    assert codes(res).get(bad) == code, res.rejects.to_dict("records")
    assert bad not in set(res.manifest["source_path"])
    assert "good.png" in set(res.manifest["source_path"])  # one bad file never costs the others


def test_unreadable_caption_leaves_the_photo_without_sidecar(data_root, image_cache):
    folder = write_concept(data_root, "c", {"good.png": GOOD, "good.txt": b"caf\xe9 latte"})  # latin-1, not UTF-8
    res = ingest(folder, data_root, image_cache)
    assert codes(res) == {"good.txt": "unreadable_caption"}
    assert "0xe9" in res.rejects["reason"][0]
    assert res.manifest["sidecar_caption"].isna().all()


def test_sidecar_caption_is_read_and_normalized(data_root, image_cache):
    folder = write_concept(data_root, "c", {"good.png": GOOD, "good.txt": "\ufeffa photo of\n sks  dog \n".encode()})
    res = ingest(folder, data_root, image_cache)
    assert list(res.manifest["sidecar_caption"]) == ["a photo of sks dog"]
    assert res.rejects.empty


def test_overlong_sidecar_caption_is_rejected_and_the_photo_kept(data_root, image_cache):
    """A 10 MB sidecar used to become a 100 MB materialization event and a 10 MB lineage file."""
    folder = write_concept(data_root, "c", {"good.png": GOOD, "good.txt": b"sks dog " * 1_300_000,
                                            "other.png": encode(photo("chelsea", (64, 64)), "PNG"),
                                            "other.txt": b"tag, " * 500})  # 2,499 characters: just over 2,000
    res = ingest(folder, data_root, image_cache)
    assert codes(res) == {"good.txt": "caption_too_long", "other.txt": "caption_too_long"}
    assert "10,400,000 bytes > 2,000 characters" in res.rejects.set_index("source_path").loc["good.txt", "reason"]
    assert "2,499 characters > 2,000" in res.rejects.set_index("source_path").loc["other.txt", "reason"]
    assert sorted(res.manifest["source_path"]) == ["good.png", "other.png"]
    assert res.manifest["sidecar_caption"].isna().all()
    ok = ingest_concept(folder, data_root, image_cache, IngestConfig(max_caption_chars=3000))
    assert codes(ok) == {"good.txt": "caption_too_long"}


def test_symlink_outside_data_root_is_rejected_unread(tmp_path, data_root, image_cache, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret_bytes = encode(photo("chelsea", (64, 64)), "JPEG")
    secret.write_bytes(secret_bytes)
    (outside / "album").mkdir()
    folder = write_concept(data_root, "c", {"good.png": GOOD})
    (folder / "linked.jpg").symlink_to(secret)
    (folder / "linked_album").symlink_to(outside / "album", target_is_directory=True)

    opened: list[Path] = []
    real_open, real_os_open = io.open, os.open

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        opened.append(Path(path).resolve())
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    res = ingest(folder, data_root, image_cache)
    monkeypatch.undo()

    assert codes(res) == {"linked.jpg": "outside_data_root", "linked_album": "outside_data_root"}
    assert secret.resolve() not in opened
    assert (folder / "good.png").resolve() in opened  # the spy does see the reads ingest makes
    assert hashlib.sha256(secret_bytes).hexdigest() not in set(res.manifest["image_sha256"])
    assert list(res.manifest["source_path"]) == ["good.png"]


def test_dangling_symlink_is_a_reject_not_a_crash(data_root, image_cache):
    folder = write_concept(data_root, "c", {"good.png": GOOD})
    (folder / "gone.jpg").symlink_to(folder / "deleted.jpg")
    (folder / "good.txt").symlink_to(folder / "deleted.txt")
    res = ingest(folder, data_root, image_cache)
    assert codes(res) == {"gone.jpg": "unreadable", "good.txt": "unreadable"}
    assert list(res.manifest["source_path"]) == ["good.png"]


def test_fifo_and_socket_are_rejected_unopened(data_root, image_cache):
    """Issue 28, point 9: a FIFO named pipe.jpg hung raw_images forever (reading it waits for a writer). Now a
    FIFO or a socket is a reject with its reason, never opened: a watcher that would feed any reader of the FIFOs
    (and so unblock the old code, to fail here rather than hang) finds none."""
    import socket
    import threading

    folder = write_concept(data_root, "c", {"good.png": GOOD})
    fifos = [folder / "pipe.jpg", folder / "pipe.txt"]
    for fifo in fifos:
        os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.png"))
    fed, stop = [], threading.Event()

    def feed_readers():  # opening a FIFO to write, non-blocking, succeeds only while someone has it open to read
        while not stop.is_set():
            for fifo in fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                fed.append(fifo.name)
                os.write(fd, b"hello")
                os.close(fd)
            stop.wait(0.01)

    watcher = threading.Thread(target=feed_readers, daemon=True)
    watcher.start()
    try:
        res = ingest(folder, data_root, image_cache)
    finally:
        stop.set()
        watcher.join()
        sock.close()
    assert fed == []
    assert codes(res) == {"pipe.jpg": "special_file", "pipe.txt": "special_file", "sock.png": "special_file"}
    reasons = dict(zip(res.rejects["source_path"], res.rejects["reason"]))
    assert reasons["pipe.jpg"].startswith("a named pipe (FIFO), not a regular file: not opened")
    assert reasons["sock.png"].startswith("a socket, not a regular file: not opened")
    assert list(res.manifest["source_path"]) == ["good.png"]


def test_symlink_loops_are_rejected_not_a_crash(data_root, image_cache):
    """Issue 28, point 9: a symbolic link loop failed the whole step (RuntimeError: Symlink loop)."""
    folder = write_concept(data_root, "c", {"good.png": GOOD})
    (folder / "self.jpg").symlink_to(folder / "self.jpg")
    (folder / "ping.png").symlink_to(folder / "pong.png")
    (folder / "pong.png").symlink_to(folder / "ping.png")
    (folder / "loop.txt").symlink_to(folder / "loop.txt")
    res = ingest(folder, data_root, image_cache)
    assert codes(res) == {"self.jpg": "symlink_loop", "ping.png": "symlink_loop", "pong.png": "symlink_loop",
                          "loop.txt": "symlink_loop"}
    assert all(r.startswith("symbolic link loop (Too many levels of symbolic links): not read")
               for r in res.rejects["reason"])
    assert list(res.manifest["source_path"]) == ["good.png"]


def test_a_device_is_rejected_unopened(tmp_path, image_cache, monkeypatch):
    """A link to a device (here /dev/null, inside a data root of '/') is named as one and never opened."""
    folder = write_concept(tmp_path / "data", "c", {"good.png": GOOD})
    (folder / "null.png").symlink_to("/dev/null")
    opened: list[str] = []
    real_os_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **kw: opened.append(str(path)) or real_os_open(path, *a, **kw))
    res = ingest(folder, Path("/"), image_cache)
    monkeypatch.undo()
    assert codes(res) == {"null.png": "special_file"}
    assert res.rejects["reason"][0].startswith("a character device, not a regular file: not opened")
    assert str(folder / "null.png") not in opened and "/dev/null" not in opened
    assert str(folder / "good.png") in opened  # the spy sees the reads ingest makes


# ---- unusual but valid images decode correctly -----------------------------------------------------------------


def _decoded(res, name: str) -> Image.Image:
    row = res.manifest.set_index("source_path").loc[name]
    img = Image.open(row["decoded_path"])
    assert img.mode == "RGB"
    assert (row["width"], row["height"]) == img.size
    return img


def test_cmyk_jpeg(data_root, image_cache):
    src = photo("astronaut", (96, 96))
    folder = write_concept(data_root, "c", {"cmyk.jpg": encode(src.convert("CMYK"), "JPEG", quality=95)})
    res = ingest(folder, data_root, image_cache)
    assert res.manifest["source_mode"].tolist() == ["CMYK"]
    assert mean_abs_diff(_decoded(res, "cmyk.jpg"), src) < 6


def test_16bit_grayscale_png_is_scaled_not_clipped(data_root, image_cache):
    ramp = np.tile(np.linspace(0, 65535, 128).round().astype(np.uint16), (64, 1))  # black -> white, left to right
    img16 = Image.fromarray(ramp)
    assert img16.mode.startswith("I;16")
    folder = write_concept(data_root, "c", {"deep.png": encode(img16, "PNG")})
    res = ingest(folder, data_root, image_cache)
    out = np.asarray(_decoded(res, "deep.png"), np.float64)
    expected = ramp / 65535.0 * 255.0
    assert np.abs(out[..., 0] - expected).max() <= 1.0
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert 120 <= out[0, 64, 0] <= 135  # mid-grey stays mid-grey (clipping would make it 255)


def test_palette_png_transparency_becomes_white(data_root, image_cache):
    idx = np.zeros((32, 64), np.uint8)
    idx[:, 32:] = 1
    pal = Image.fromarray(idx, "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    folder = write_concept(data_root, "c", {"pal.png": encode(pal, "PNG", transparency=0)})
    res = ingest(folder, data_root, image_cache)
    out = np.asarray(_decoded(res, "pal.png"))
    assert (out[:, :32] == 255).all()  # transparent red -> white, not red or black
    assert (out[:, 32:] == [0, 0, 255]).all()


def test_rgba_is_composited_on_white(data_root, image_cache):
    px = np.zeros((32, 96, 4), np.uint8)
    px[:, :32] = [255, 0, 0, 0]  # fully transparent red
    px[:, 32:64] = [0, 0, 0, 128]  # half-transparent black
    px[:, 64:] = [0, 200, 0, 255]  # opaque green
    folder = write_concept(data_root, "c", {"rgba.png": encode(Image.fromarray(px, "RGBA"), "PNG")})
    res = ingest(folder, data_root, image_cache)
    out = np.asarray(_decoded(res, "rgba.png")).astype(int)
    assert (out[:, :32] == 255).all()
    assert np.abs(out[:, 32:64] - 127).max() <= 1
    assert (out[:, 64:] == [0, 200, 0]).all()


def test_exif_rotated_jpeg_is_upright(data_root, image_cache):
    upright = photo("astronaut", (120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones store portrait shots
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (80, 120)
    folder = write_concept(data_root, "c", {"phone.jpg": encode(stored, "JPEG", quality=95, exif=exif.tobytes())})
    res = ingest(folder, data_root, image_cache)
    assert res.manifest["exif_orientation"].tolist() == [6]
    out = _decoded(res, "phone.jpg")
    assert out.size == (120, 80)
    assert mean_abs_diff(out, upright) < 6
    # The comparison can tell orientations apart: the upside-down photo is far from the upright one.
    assert mean_abs_diff(upright.transpose(Image.Transpose.ROTATE_180), upright) > 30


def test_webp(data_root, image_cache):
    src = photo("coffee", (120, 80))
    folder = write_concept(data_root, "c", {"shot.webp": encode(src, "WEBP", quality=95)})
    res = ingest(folder, data_root, image_cache)
    assert res.manifest["format"].tolist() == ["WEBP"]
    assert mean_abs_diff(_decoded(res, "shot.webp"), src) < 6


def test_grayscale_and_gray_alpha(data_root, image_cache):
    gray = photo("chelsea", (64, 48)).convert("L")
    la = Image.merge("LA", [gray, Image.new("L", gray.size, 255)])
    folder = write_concept(data_root, "c", {"gray.jpg": encode(gray, "JPEG", quality=95),
                                            "la.png": encode(la, "PNG")})
    res = ingest(folder, data_root, image_cache)
    assert res.rejects.empty
    assert mean_abs_diff(_decoded(res, "la.png"), gray.convert("RGB")) == 0
    assert mean_abs_diff(_decoded(res, "gray.jpg"), gray.convert("RGB")) < 4


def test_odd_file_names(data_root, image_cache):
    files = {
        "my photo (1).JPG": encode(photo("astronaut", (64, 64)), "JPEG"),
        "my photo (1).txt": b"a photo of sks dog on a sofa",
        "caf\u00e9 \u2615 \u00fcber.png": encode(photo("coffee", (90, 60)), "PNG"),
        "UPPER.PNG": encode(photo("rocket", (90, 60)), "PNG"),
        "dots.in.name.webp": encode(photo("chelsea", (90, 60)), "WEBP"),
    }
    folder = write_concept(data_root, "c", files)
    res = ingest(folder, data_root, image_cache)
    assert res.rejects.empty, res.rejects.to_dict("records")
    assert set(res.manifest["source_path"]) == {n for n in files if not n.endswith(".txt")}
    captions = dict(zip(res.manifest["source_path"], res.manifest["sidecar_caption"]))
    assert captions["my photo (1).JPG"] == "a photo of sks dog on a sofa"


def test_decode_image_reports_pixel_limit_before_decoding():
    data = encode(photo("astronaut", (300, 300)), "PNG")
    from assets_pipeline.stages.ingest import RejectedFile

    with pytest.raises(RejectedFile) as e:
        decode_image(data, IngestConfig(max_pixels=300 * 300 - 1))
    assert e.value.code == "pixel_limit"
    img, fmt, mode, orientation = decode_image(data, IngestConfig(max_pixels=300 * 300))
    assert (img.size, fmt, mode, orientation) == ((300, 300), "PNG", "RGB", 1)


def test_ingest_config_rejects_nonsense():
    with pytest.raises(ValueError, match="positive"):
        IngestConfig(max_pixels=0)
