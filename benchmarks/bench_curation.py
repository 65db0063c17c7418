"""Quality-filter metrics (stages.curation.image_metrics): the hand-written version this replaced vs the library one.

    python benchmarks/bench_curation.py                  # CPU, 1-2 min on 2 cores: 60 photos, 3 passes
    python benchmarks/bench_curation.py --passes 5 --blur-side 512

Three implementations of the same two measurements (blur = variance of the Laplacian, pHash = 64-bit DCT hash):

    old       the pre-issue-12 code, copied below: a hand-written Laplacian stencil and a hand-built DCT matrix
              (Pillow for grayscale and resizing)
    new       assets_pipeline.stages.curation.image_metrics as it is now: skimage.filters.laplace and
              scipy.fft.dctn (Pillow for grayscale and resizing)
    skimage   everything in scikit-image: skimage.color.rgb2gray, skimage.transform.resize (anti_aliasing) for
              the blur copy and the 32x32 hash copy, skimage.filters.laplace, scipy.fft.dctn (considered, not used)

Photos: every real photo that ships inside the scikit-image wheel (skimage.data, no download) plus matplotlib's
grace_hopper, each resized to 512, 768 and 1024 px on the longer side and stored as RGB PNG (what ingest writes
and image_metrics reads). Per-image time is the best of ``--passes`` passes, mean over photos, decode included;
``decode`` is Pillow's PNG decode + convert("RGB") alone, so time minus decode is the metric's own cost.

Agreement: blur values (relative difference) and Hamming distance between each version's hash and old's on the
photos; blur (< 100) and near-duplicate (distance <= 10) decisions on those photos (the three sizes of one photo
should match each other, different photos should not: the two motorcycle stereo views, one scene, do); and the full filter_images decisions on the demo concept
(assets_pipeline/demo_data.py, ingested as the pipeline does) under each version.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

# skimage.data photos shipped in the wheel (no pooch download); binary/synthetic images (horse, logo, chessboard,
# color, phantom, binary blobs) are left out.
SKIMAGE_PHOTOS = [
    "astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket", "text",
]
SKIMAGE_FILES = ["motorcycle_left.png", "motorcycle_right.png"]  # same scene, two viewpoints
SIZES = (512, 768, 1024)


# --- old: the hand-written version (assets_pipeline/stages/curation.py, METRICS_VERSION 1), verbatim ---------

def old_laplacian_variance(gray: np.ndarray) -> float:
    g = gray.astype(np.float64)
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


_DCT32 = _dct_matrix(32)


def old_phash(img) -> int:
    from PIL import Image

    g = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ g @ _DCT32.T)[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def old_image_metrics(path: str, blur_side: int) -> dict:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    gray = img.convert("L")
    scale = blur_side / max(gray.size)
    if scale < 1:
        gray = gray.resize((max(3, round(gray.width * scale)), max(3, round(gray.height * scale))),
                           Image.Resampling.BILINEAR)
    return {"blur_variance": old_laplacian_variance(np.asarray(gray)), "phash": f"{old_phash(img):016x}"}


# --- skimage: everything in scikit-image (considered) -----------------------------------------------------------

def skimage_image_metrics(path: str, blur_side: int) -> dict:
    from PIL import Image
    from scipy.fft import dctn
    from skimage.color import rgb2gray
    from skimage.filters import laplace
    from skimage.transform import resize

    gray = rgb2gray(np.asarray(Image.open(path).convert("RGB"))) * 255.0  # float, grey levels 0..255
    scale = blur_side / max(gray.shape)
    small = gray
    if scale < 1:
        small = resize(gray, (max(3, round(gray.shape[0] * scale)), max(3, round(gray.shape[1] * scale))),
                       order=1, anti_aliasing=True)
    blur = float(laplace(small)[1:-1, 1:-1].var())
    low = dctn(resize(gray, (32, 32), order=3, anti_aliasing=True), type=2)[:8, :8]
    h = int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big")
    return {"blur_variance": blur, "phash": f"{h:016x}"}


# ---------------------------------------------------------------------------------------------------------------

def write_photos(folder: Path) -> list[tuple[str, str]]:
    """(source name, png path) for every photo at every size."""
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    sources = {n: Image.fromarray(np.asarray(getattr(data, n)())).convert("RGB") for n in SKIMAGE_PHOTOS}
    for f in SKIMAGE_FILES:
        sources[f.removesuffix(".png")] = Image.open(Path(data.__file__).parent / f).convert("RGB")
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        sources["grace_hopper"] = Image.open(f).convert("RGB")
    out = []
    for name, img in sources.items():
        for side in SIZES:
            s = side / max(img.size)
            path = folder / f"{name}_{side}.png"
            img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS).save(path)
            out.append((name, str(path)))
    return out


def best_times(fns: dict, xs: list, passes: int) -> dict[str, list[float]]:
    """Best-of-``passes`` seconds of each fn on each x; the fns take turns on each x, so a load spike from other
    processes on a shared machine lands on all of them alike rather than on whichever ran then."""
    best = {k: [float("inf")] * len(xs) for k in fns}
    for _ in range(passes):
        for i, x in enumerate(xs):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(x)
                best[k][i] = min(best[k][i], time.perf_counter() - t)
    return best


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def demo_decisions(impls: dict, tmp: Path) -> dict[str, dict[str, str]]:
    """filter_images on the ingested demo concept under each implementation:
    {impl: {source_path: (blur, phash, "kept" or the reasons)}}."""
    from assets_pipeline import demo_data
    from assets_pipeline.models.embedded import RESOLUTION
    from assets_pipeline.stages import curation
    from assets_pipeline.stages.ingest import ingest_concept
    from assets_pipeline.store import ItemCache

    folder = demo_data.write_demo_concept(tmp / "data")
    manifest = ingest_concept(folder, tmp / "data", ItemCache(tmp / "art", "decoded", ".png")).manifest
    captioned = manifest[["image_sha256", "source_path", "decoded_path"]].assign(caption="a photo of sks scene")
    real = curation.image_metrics
    out = {}
    try:
        for name, fn in impls.items():
            curation.image_metrics = fn
            df = curation.filter_images(captioned, manifest, curation.QualityConfig(), RESOLUTION["tiny"],
                                        ItemCache(tmp / f"metrics_{name}", "quality_metrics", ".json"))
            out[name] = {r.source_path: (r.blur_variance, r.phash, "kept" if r.kept else r.reason)
                         for r in df.itertuples()}
    finally:
        curation.image_metrics = real
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--blur-side", type=int, default=512, help="QualityConfig.blur_side")
    args = ap.parse_args()

    from PIL import Image

    from assets_pipeline.stages.curation import QualityConfig, image_metrics

    cfg = QualityConfig(blur_side=args.blur_side)
    impls = {"old": old_image_metrics, "new": image_metrics, "skimage": skimage_image_metrics}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        photos = write_photos(tmp)
        names, paths = [n for n, _ in photos], [p for _, p in photos]
        for fn in impls.values():  # warm imports and caches
            fn(paths[0], cfg.blur_side)
        print(f"{len(paths)} photos ({len(set(names))} sources x {SIZES} px longer side, RGB PNG), "
              f"best of {args.passes} passes, {platform.processor() or platform.machine()}, "
              f"python {platform.python_version()}")

        times = best_times({"decode": lambda p: Image.open(p).convert("RGB"),
                            **{k: (lambda p, fn=fn: fn(p, cfg.blur_side)) for k, fn in impls.items()}},
                           paths, args.passes)
        decode = times.pop("decode")
        print(f"\n{'per image, ms':<14}{'mean':>9}{'median':>9}{'- decode':>10}{'vs old':>8}")
        print(f"{'decode':<14}{1e3 * statistics.mean(decode):9.2f}{1e3 * statistics.median(decode):9.2f}")
        old_net = statistics.mean(times["old"]) - statistics.mean(decode)
        for k, t in times.items():
            net = statistics.mean(t) - statistics.mean(decode)
            print(f"{k:<14}{1e3 * statistics.mean(t):9.2f}{1e3 * statistics.median(t):9.2f}{1e3 * net:10.2f}"
                  f"{net / old_net:7.2f}x")
        for side in SIZES:
            sel = [i for i, p in enumerate(paths) if p.endswith(f"_{side}.png")]
            print(f"  {side} px: " + ", ".join(
                f"{k} {1e3 * statistics.mean(t[i] for i in sel):.2f}" for k, t in times.items())
                + f", decode {1e3 * statistics.mean(decode[i] for i in sel):.2f} ms")

        from assets_pipeline.stages.curation import laplacian_variance, phash

        imgs = [Image.open(p).convert("RGB") for p in paths]
        grays = [np.asarray(g.resize((round(g.width * cfg.blur_side / max(g.size)),
                                      round(g.height * cfg.blur_side / max(g.size))), Image.Resampling.BILINEAR))
                 for g in (im.convert("L") for im in imgs)]  # image_metrics' blur copy (every photo >= 512 px)
        print(f"\nthe two measurements alone, per image, ms (Laplacian on a ~{cfg.blur_side} px grey copy, pHash on "
              f"the full RGB photo, which includes Pillow's grayscale + 32x32 Lanczos resize):")
        for label, a, b, xs in [("Laplacian variance", old_laplacian_variance, laplacian_variance, grays),
                                ("pHash", old_phash, phash, imgs)]:
            ta, tb = (statistics.mean(t) for t in best_times({"old": a, "new": b}, xs, args.passes).values())
            print(f"  {label:<20} old {1e3 * ta:6.2f}  new {1e3 * tb:6.2f}  ({tb / ta:.2f}x)")

        metrics = {k: [fn(p, cfg.blur_side) for p in paths] for k, fn in impls.items()}
        print(f"\nagreement with old on the photos (blur < {cfg.min_blur_variance} = blurry, "
              f"distance <= {cfg.max_hash_distance} = duplicate):")
        old = metrics["old"]
        pairs = list(itertools.combinations(range(len(paths)), 2))
        for k, ms in metrics.items():
            rel = [abs(m["blur_variance"] - o["blur_variance"]) / o["blur_variance"] for m, o in zip(ms, old)]
            dist = [hamming(m["phash"], o["phash"]) for m, o in zip(ms, old)]
            is_blurry = [m["blur_variance"] < cfg.min_blur_variance for m in ms]
            blurry = sum(is_blurry)
            blur_flips = sum(b != (o["blur_variance"] < cfg.min_blur_variance) for b, o in zip(is_blurry, old))
            dup = {(i, j) for i, j in pairs if hamming(ms[i]["phash"], ms[j]["phash"]) <= cfg.max_hash_distance}
            old_dup = {(i, j) for i, j in pairs if hamming(old[i]["phash"], old[j]["phash"]) <= cfg.max_hash_distance}
            same = {(i, j) for i, j in pairs if names[i] == names[j]}
            print(f"  {k:<8} blur rel. diff max {max(rel):.1e} median {statistics.median(rel):.1e}; "
                  f"blurry {blurry}, flips {blur_flips}; hash distance to old max {max(dist)} mean "
                  f"{statistics.mean(dist):.2f}; duplicate pairs {len(dup)} (same photo {len(dup & same)}/{len(same)}, "
                  f"different photos {len(dup - same)}), differing from old {len(dup ^ old_dup)}")
            if dup - same:
                print("           different photos counted as duplicates: "
                      + ", ".join(sorted({f"{names[i]}~{names[j]}" for i, j in dup - same})))

        print("\ndemo concept, filter_images (min_side = the embedded model's resolution), blur / pHash / decision:")
        demo = demo_decisions(impls, tmp / "demo")
        for src in demo["old"]:
            print(f"  {src}")
            for k in impls:
                blur, h, decision = demo[k][src]
                print(f"    {k:<8}{blur:9.1f}  {h}  {decision}")
        for k in impls:  # the decision and the kind of each reason, not the measurements quoted in it
            same = all(re.sub(r"[\d.]+", "#", demo[k][s][2]) == re.sub(r"[\d.]+", "#", demo["old"][s][2])
                       for s in demo["old"])
            print(f"  {k}: decisions {'identical to' if same else 'DIFFER from'} old")


if __name__ == "__main__":
    main()
