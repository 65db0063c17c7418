"""The demo concept: real photos that ship inside installed wheels, plus deliberately bad files.

Written deterministically (same bytes on every machine with the same Pillow) from scikit-image's
``skimage.data`` and matplotlib's ``sample_data``, so every filter and reject path visibly does its job:

    good photos .......... astronaut, chelsea (cat), coffee, rocket, motorcycle, grace_hopper (EXIF-rotated)
    blurred copy ......... dropped by the blur filter
    exact duplicate ...... rejected at ingest (same bytes)
    re-encoded near dup .. dropped by the perceptual-hash filter
    too small ............ dropped by the minimum-side filter
    panorama strip ....... dropped by the aspect-ratio filter
    truncated file ....... rejected at ingest
    non-image .jpg ....... rejected at ingest
    non-UTF-8 caption .... rejected at ingest (its photo falls back to the template caption)
"""

from __future__ import annotations

import io
from pathlib import Path

DEMO_CONCEPT = "sample_photos"
DEMO_SPEC = """\
# The demo concept: see assets_pipeline/demo_data.py for what each file is for.
token = "sks"
class_noun = "scene"
methods = ["lora", "dreambooth", "textual_inversion", "controlnet"]
"""
# The demo's SDXL concept: the same good photos (square, landscape and portrait, so it trains in several
# aspect-ratio buckets) on the embedded tiny SDXL, chosen in concept.toml for this concept only.
DEMO_SDXL_CONCEPT = "sample_sdxl"
DEMO_SDXL_SPEC = """\
# The demo's SDXL concept: the demo photos on the embedded tiny SDXL (see assets_pipeline/demo_data.py).
token = "sks"
class_noun = "scene"
methods = ["lora", "dreambooth", "textual_inversion", "controlnet"]

[base_model]
source = "embedded-sdxl"
"""
# The demo's Flux.1 concept: the same good photos on the embedded tiny Flux.1 (a flow-matching transformer with
# a T5 encoder), all four methods.
DEMO_FLUX_CONCEPT = "sample_flux"
DEMO_FLUX_SPEC = """\
# The demo's Flux.1 concept: the demo photos on the embedded tiny Flux.1 (see assets_pipeline/demo_data.py).
# LoRA (with the kohya file ComfyUI reads) and DreamBooth (class images from FluxPipeline): each method's trainer
# costs ~15 s of process start, loading and validation here, and the demo keeps Flux's share under a minute;
# tests/test_flow.py trains all four methods on SD 3.x and Flux.1.
token = "sks"
class_noun = "scene"
methods = ["lora", "dreambooth"]

[base_model]
source = "embedded-flux"
"""


def _skimage(name: str):
    import numpy as np
    from PIL import Image
    from skimage import data

    return Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")


def _skimage_file(name: str):
    from PIL import Image
    from skimage import data

    return Image.open(Path(data.__file__).parent / name).convert("RGB")


def _matplotlib(name: str):
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data(name) as f:
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def _jpeg(img, quality: int = 92, exif=None) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _exif_rotated(img) -> bytes:
    """Store the pixels rotated 90 degrees with EXIF Orientation=6 ("rotate 90 CW to display"), as phones do."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(img.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


# The photos every filter keeps (the rest of demo_files() is there to be rejected or dropped).
GOOD_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle.webp", "grace_hopper.jpg")


def demo_files() -> dict[str, bytes]:
    """File name -> bytes for the demo concept folder."""
    from PIL import Image, ImageFilter

    astronaut, chelsea, coffee = _skimage("astronaut"), _skimage("chelsea"), _skimage("coffee")
    rocket = _skimage("rocket")
    motorcycle = _skimage_file("motorcycle_left.png")  # shipped in the wheel; data.stereo_motorcycle() also
    # loads a disparity map we don't need
    hopper = _matplotlib("grace_hopper.jpg")
    rocket_jpg = _jpeg(rocket)
    coffee_png = _png(coffee)
    near = chelsea.resize((chelsea.width * 9 // 10, chelsea.height * 9 // 10), Image.Resampling.LANCZOS)
    return {
        "concept.toml": DEMO_SPEC.encode(),
        "astronaut.png": _png(astronaut),
        "astronaut.txt": b"a photo of sks scene, an astronaut in a white suit in front of a flag\n",
        "chelsea.png": _png(chelsea),
        "coffee.png": coffee_png,
        "rocket.jpg": rocket_jpg,
        "rocket.txt": b"a photo of sks scene, a rocket \xff\xfe on the pad\n",  # not UTF-8: reported
        "motorcycle.webp": _webp(motorcycle),
        "grace_hopper.jpg": _exif_rotated(hopper),
        "astronaut_blurred.jpg": _jpeg(astronaut.filter(ImageFilter.GaussianBlur(6))),
        "coffee_copy.png": coffee_png,
        "chelsea_reencoded.jpg": _jpeg(near, quality=75),
        "too_small.png": _png(coffee.resize((40, 27), Image.Resampling.LANCZOS)),
        "panorama.jpg": _jpeg(astronaut.resize((512, 128), Image.Resampling.LANCZOS)),
        "truncated.jpg": rocket_jpg[: len(rocket_jpg) * 6 // 10],
        "notes.jpg": b"These are meeting notes, saved with the wrong extension.\n",
    }


def _webp(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def demo_sdxl_files() -> dict[str, bytes]:
    """The SDXL demo concept: the demo's good photos and their captions, no deliberately bad files."""
    files = demo_files()
    keep = {*GOOD_PHOTOS, "astronaut.txt"}
    return {"concept.toml": DEMO_SDXL_SPEC.encode(), **{k: v for k, v in files.items() if k in keep}}


def demo_flux_files() -> dict[str, bytes]:
    """The Flux.1 demo concept: the SDXL demo concept's photos and captions on the embedded Flux.1."""
    return {**demo_sdxl_files(), "concept.toml": DEMO_FLUX_SPEC.encode()}


def demo_concepts(sd1_only: bool = False) -> dict[str, dict[str, bytes] | None]:
    """The demo's concepts and their files (None: :func:`demo_files`), SD 1.x first."""
    more = {} if sd1_only else {DEMO_SDXL_CONCEPT: demo_sdxl_files(), DEMO_FLUX_CONCEPT: demo_flux_files()}
    return {DEMO_CONCEPT: None, **more}


def write_demo_concept(data_root: Path, name: str = DEMO_CONCEPT, files: dict[str, bytes] | None = None) -> Path:
    """Write (or rewrite, identically) the demo concept folder (``files``, default :func:`demo_files`); files
    already equal are left untouched."""
    folder = data_root / name
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, content in (demo_files() if files is None else files).items():
        path = folder / file_name
        if not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)
    return folder
