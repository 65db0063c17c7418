"""Incremental rebuild: a concept of N photos built from scratch, then after adding one photo, then with no
change. Prints wall time and items computed per asset, items recomputed / items changed, and the one-photo
rebuild's time as a fraction of the full build.

    python benchmarks/bench_rebuild.py --photos 200 --size 1600x1200

Each build runs in a fresh process (what a scheduled or sensor-triggered run pays: imports included), through
Dagster (`dagster.materialize` of the dataset and latents groups) on an instance under --workdir. Each asset's
cell also shows its step's wall time. ``ASSETS_PIPELINE_IMAGE_THREADS=1`` runs the per-image work on one thread
(assets_pipeline/parallel.py), for a comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUPS = ("dataset", "priors", "latents")
SOURCES = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left.png", "hubble_deep_field", "grace_hopper.jpg",
           "retina", "immunohistochemistry"]


def _source(name: str):
    import numpy as np
    from PIL import Image
    from skimage import data

    if name == "grace_hopper.jpg":
        from matplotlib import cbook

        with cbook.get_sample_data(name) as f:
            return Image.open(f).convert("RGB")
    if name.endswith(".png"):
        return Image.open(Path(data.__file__).parent / name).convert("RGB")
    return Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")


def make_photo(i: int, size: tuple[int, int]) -> bytes:
    """Photo i: a seeded crop, zoom, flip and color change of a real photo, as a camera JPEG."""
    import io
    import random

    from PIL import Image, ImageEnhance, ImageOps

    rng = random.Random(i)
    src = _source(SOURCES[i % len(SOURCES)])
    zoom = rng.uniform(1.0, 1.8)
    scale = zoom * max(size[0] / src.width, size[1] / src.height)
    big = src.resize((round(src.width * scale) + 1, round(src.height * scale) + 1), Image.Resampling.BICUBIC)
    x, y = rng.randint(0, big.width - size[0]), rng.randint(0, big.height - size[1])
    img = big.crop((x, y, x + size[0], y + size[1]))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build(workdir: Path) -> dict:
    """One build in this process: materialize the dataset half for the concept, report per-asset counts."""
    t0 = time.perf_counter()
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS, default_resources
    from assets_pipeline.resources import PipelineStorage

    os.environ["DAGSTER_HOME"] = str(workdir / "dagster_home")
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("concepts", ["bench"])
    storage = PipelineStorage(data_root=str(workdir / "data"), artifact_root=str(workdir / "artifacts"))
    t1 = time.perf_counter()
    res = dg.materialize([*ASSETS, *CHECKS], selection=dg.AssetSelection.groups(*GROUPS), partition_key="bench",
                         instance=instance, resources={**default_resources(), "storage": storage},
                         run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
    t2 = time.perf_counter()
    step_s = {e.step_key: e.event_specific_data.duration_ms / 1000  # each step's wall time (a step is an asset)
              for e in res.all_events if e.event_type_value == "STEP_SUCCESS"}
    steps = {}
    for e in res.get_asset_materialization_events():
        md = {k: getattr(v, "value", v) for k, v in e.materialization.metadata.items()}
        name = e.materialization.asset_key.to_user_string()
        steps[name] = {k: md[k] for k in ("items_computed", "items_cached", "latents_computed",
                                          "text_embeds_computed", "dagster/row_count") if k in md}
        if e.step_key in step_s:
            steps[name]["step_s"] = round(step_s[e.step_key], 2)
    return {"process_s": round(t2 - t0, 2), "materialize_s": round(t2 - t1, 2), "assets": steps}


def run_phase(workdir: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--build", str(workdir)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--size", default="1600x1200", help="photo size WxH (JPEG, quality 90)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # internal: one build in this process
    args = ap.parse_args()
    if args.build:
        print(json.dumps(build(args.build)))
        return 0
    size = tuple(int(v) for v in args.size.split("x"))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_rebuild_"))
    concept = workdir / "data" / "bench"
    concept.mkdir(parents=True)
    (workdir / "dagster_home").mkdir()
    (concept / "concept.toml").write_text('token = "sks"\nclass_noun = "scene"\nmethods = []\n')
    t = time.perf_counter()
    for i in range(args.photos):
        (concept / f"photo_{i:04d}.jpg").write_bytes(make_photo(i, size))
    print(f"wrote {args.photos} photos of {size[0]}x{size[1]} in {time.perf_counter() - t:.0f} s under {workdir}",
          flush=True)
    from assets_pipeline.parallel import ENV, image_threads

    print(f"per-image work on {image_threads()} threads ({ENV} sets it)", flush=True)

    phases = {"full build": run_phase(workdir)}
    (concept / f"photo_{args.photos:04d}.jpg").write_bytes(make_photo(args.photos, size))
    phases["+1 photo"] = run_phase(workdir)
    phases["no change"] = run_phase(workdir)
    for name, p in phases.items():
        print(json.dumps({"phase": name, **p}))

    assets = list(phases["full build"]["assets"])
    print(f"\n{'asset':<20}" + "".join(f"{n:>24}" for n in phases))
    print(f"{'':<20}" + "".join(f"{'computed/cached':>24}" for _ in phases))
    for a in assets:
        cells = []
        for p in phases.values():
            s = p["assets"].get(a, {})
            cells.append(f"{s.get('items_computed', '-')}/{s.get('items_cached', '-')}"
                         + (f" {s['step_s']:>7.2f} s" if "step_s" in s else ""))
        print(f"{a:<20}" + "".join(f"{c:>24}" for c in cells))
    print(f"{'wall s (process)':<20}" + "".join(f"{p['process_s']:>24}" for p in phases.values()))
    print(f"{'wall s (materialize)':<20}" + "".join(f"{p['materialize_s']:>24}" for p in phases.values()))
    one = phases["+1 photo"]
    per_image = ["raw_images", "filtered_images", "clip_scored_images", "control_images"]
    ratios = {a: one["assets"][a]["items_computed"] / 1 for a in per_image}
    ratios["vae_latents (latents)"] = one["assets"]["vae_latents"]["latents_computed"] / 1
    print("\nitems recomputed / items changed after +1 photo:", json.dumps(ratios))
    print("items computed with no change:",
          sum(s.get("items_computed", 0) for s in phases["no change"]["assets"].values()))
    print(f"+1 photo rebuild / full build: {one['process_s'] / phases['full build']['process_s']:.1%} (process), "
          f"{one['materialize_s'] / phases['full build']['materialize_s']:.1%} (materialize only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
