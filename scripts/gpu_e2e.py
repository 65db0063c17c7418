"""The whole asset graph end to end through Dagster, on a GPU at Stable Diffusion 1.5 size.

Writes a random-weight diffusers folder with SD 1.5's shapes (``--shapes sd15``; ``sdxl``: SDXL base 1.0's at
1024 px; ``tiny`` builds the project's
embedded test model instead, for a quick run on a CPU), points the ``base_model`` resource at it, writes a small
concept of real photos (from installed wheels: assets_pipeline/demo_data.py) and materializes every asset for it, one asset
per Dagster run in topological order, then that asset's checks in a run of their own. Prints per asset: the
step's wall time (STEP_START -> STEP_SUCCESS in the run's event log), peak GPU memory (in-process assets:
``torch.cuda.max_memory_allocated`` reset per run; model assets train in a subprocess and report their own
peak and images/s in the materialization metadata), then every asset check. Exits 1 if an asset or a check
fails, 2 if a dependency is missing (saying what and how to provide it).

Everything is written under ``--workdir``: data root, artifact root, DAGSTER_HOME and library caches.

    bash scripts/gpu_e2e.sh                                   # SD 1.5 shapes on the GPU
    bash scripts/gpu_e2e.sh --shapes tiny --device cpu        # the same flow in about a minute on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONCEPT = "gpu_e2e"
METHODS = ("lora", "dreambooth", "textual_inversion", "controlnet")
# import name -> distribution (what to install); the project's runtime imports.
DEPENDENCIES = {
    "torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "peft": "peft",
    "accelerate": "accelerate", "safetensors": "safetensors", "dagster": "dagster", "dagster_pipes": "dagster-pipes",
    "open_clip": "open_clip_torch", "controlnet_aux": "controlnet_aux", "ftfy": "ftfy", "pandas": "pandas",
    "pyarrow": "pyarrow", "skimage": "scikit-image", "matplotlib": "matplotlib", "PIL": "pillow",
}
# What a random-weight model may cost (the trained outputs of random weights mean nothing; the timings do).
# Photos: the demo sources (``demo_data``), resized to the profile's shorter side (upscaled where smaller).
PROFILES = {
    "sd15": {"photos": 8, "short_side": 512, "num_class_images": 8, "class_image_steps": 20,
             "steps": {"lora": 100, "dreambooth": 50, "textual_inversion": 100, "controlnet": 50}},
    # The same photos at 1024 px all pass the quality filter too (its blur measure works at 512 px).
    "sdxl": {"photos": 8, "short_side": 1024, "num_class_images": 8, "class_image_steps": 20,
             "steps": {"lora": 100, "dreambooth": 50, "textual_inversion": 100, "controlnet": 50}},
    "tiny": {"photos": 5, "short_side": 96, "num_class_images": 2, "class_image_steps": 2,
             "steps": {"lora": 2, "dreambooth": 2, "textual_inversion": 2, "controlnet": 2}},
}
# (file stem, demo_data loader, source name): real photos shipped in the scikit-image and matplotlib wheels,
# chosen to pass the quality filter at 512 px (sharp enough, no two within pHash distance 10).
PHOTOS = [
    ("astronaut", "_skimage", "astronaut"), ("chelsea", "_skimage", "chelsea"), ("coffee", "_skimage", "coffee"),
    ("rocket", "_skimage", "rocket"), ("motorcycle", "_skimage_file", "motorcycle_left.png"),
    ("grace_hopper", "_matplotlib", "grace_hopper.jpg"), ("camera", "_skimage", "camera"),
    ("hubble", "_skimage", "hubble_deep_field"),
]
# Read from the model assets' materialization metadata (the trainer reports them; "n/a" where it does not).
TRAINER_KEYS = ("images_per_s", "peak_mem_gib", "train_s", "warmup_s", "micro_batch", "compile", "attention")
INSTALL_HELP = """\
How to provide them:
  - with internet: `bash scripts/setup.sh` (creates .venv with the pinned versions), then run this with
    PYTHON=.venv/bin/python (scripts/gpu_e2e.sh picks .venv/bin/python when it exists);
  - offline (a GPU machine with torch/transformers/peft/accelerate but not the rest): on a machine with
    internet run `bash scripts/device_wheels.sh` (writes .whl/), carry .whl/ over, then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site:$PWD
  See docs/gpu.md."""


# -- dependencies ---------------------------------------------------------------------------------------------
def check_dependencies(need_cuda: bool) -> list[str]:
    """Return what is missing (empty = ready). Presence is checked without importing (controlnet_aux alone takes
    seconds to import); torch is imported for the CUDA check. Version ranges that the installed distributions
    declare but the environment does not meet are printed as warnings: they may or may not matter."""
    from importlib.util import find_spec

    problems = [f"{dist} (import {module})" for module, dist in DEPENDENCIES.items() if find_spec(module) is None]
    if not problems and need_cuda:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"CUDA: torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False); "
                            "use a GPU machine, or --device cpu (SD 1.5 size on a CPU takes hours), or --shapes tiny")
    if not problems:
        for line in _version_conflicts([*DEPENDENCIES.values(), "dagster-shared"]):
            print(f"warning: {line}", file=sys.stderr)
    return problems


def _version_conflicts(dists: list[str]) -> list[str]:
    """Requirements (no extras) of ``dists`` that the installed versions do not satisfy, as pip check would."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["packaging is not installed: version ranges not checked"]
    out = []
    for dist in dists:
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                out.append(f"{dist} requires {req}, which is not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                out.append(f"{dist} requires {req}, installed {req.name} {have}")
    return out


# -- the base model -------------------------------------------------------------------------------------------
def ensure_base_model(workdir: Path, artifact_root: Path, shapes: str, dtype: str, device: str) -> tuple[str, Path, float]:
    """Build (once per workdir) the random base model; return the ``base_model`` source, its folder and the
    build seconds. ``sd15`` and ``sdxl`` are diffusers folders like a real checkpoint (validation renders at the
    model's resolution, steps in proportion to the training).
    ``tiny`` is the project's embedded model, built into the artifact root by the project's own builder: its
    kind is 'embedded', so validation renders stay few (4 steps, 1 seed) and the flow fits a CPU test."""
    from assets_pipeline.models.embedded import EMBEDDED, EMBEDDED_MODELS, ensure_embedded, write_model_folder

    t0 = time.perf_counter()
    if shapes == "tiny":
        built = (artifact_root / "base_models" / EMBEDDED_MODELS[EMBEDDED][0] / "model_index.json").is_file()
        folder = ensure_embedded(artifact_root / "base_models")
        return EMBEDDED, folder, 0.0 if built else time.perf_counter() - t0
    folder = workdir / "base_model" / f"{shapes}-random-{dtype}"
    if (folder / "model_index.json").is_file():
        return str(folder), folder, 0.0
    write_model_folder(shapes, folder, device, {"fp32": "float32", "fp16": "float16"}[dtype])
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return str(folder), folder, time.perf_counter() - t0


def folder_gib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30


# -- the concept ----------------------------------------------------------------------------------------------
def concept_toml(profile: dict, steps: int | None, methods=METHODS) -> str:
    """Caps the cost: a few optimizer steps per method, a few class images with few denoising steps."""
    lines = ['token = "sks"', 'class_noun = "scene"', f"methods = {json.dumps(list(methods))}", "",
             "[class_images]", f"num_inference_steps = {profile['class_image_steps']}", ""]
    for method in methods:
        lines += [f"[{method}]", f"max_train_steps = {steps or profile['steps'][method]}"]
        if method == "dreambooth":
            lines.append(f"num_class_images = {profile['num_class_images']}")
        lines.append("")
    return "\n".join(lines)


def write_concept(data_root: Path, profile: dict, n_photos: int, steps: int | None, methods=METHODS) -> Path:
    from PIL import Image

    from assets_pipeline import demo_data

    folder = data_root / CONCEPT
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "concept.toml").write_text(concept_toml(profile, steps, methods))
    for stem, loader, name in PHOTOS[:n_photos]:
        img = getattr(demo_data, loader)(name)
        scale = profile["short_side"] / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        (folder / f"{stem}.jpg").write_bytes(demo_data._jpeg(img, quality=95))
    return folder


# -- running the graph ----------------------------------------------------------------------------------------
def toposorted(assets) -> list:
    """The asset definitions in dependency order (stable: ties keep the given order)."""
    keys = {a.key for a in assets}
    done, order = set(), []
    while len(order) < len(assets):
        ready = [a for a in assets if a.key not in done and all(d in done for d in a.dependency_keys & keys)]
        if not ready:
            raise ValueError("the asset graph has a cycle")
        order.append(ready[0])
        done.add(ready[0].key)
    return order


def step_seconds(instance, run_id: str) -> dict[str, float]:
    """Step key -> seconds from STEP_START to STEP_SUCCESS/STEP_FAILURE, read from the run's event log."""
    starts, out = {}, {}
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is None or not ev.step_key:
            continue
        if ev.event_type_value == "STEP_START":
            starts[ev.step_key] = entry.timestamp
        elif ev.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and ev.step_key in starts:
            out[ev.step_key] = entry.timestamp - starts[ev.step_key]
    return out


def run_errors(res) -> list[str]:
    return [f"{ev.step_key}: {ev.step_failure_data.error.message.strip()}"
            for ev in res.all_events if ev.event_type_value == "STEP_FAILURE" and ev.step_failure_data.error]


class GpuMemory:
    """Peak CUDA memory of this process since the last reset (None without CUDA)."""

    def __init__(self, enabled: bool):
        import torch

        self.torch = torch
        self.enabled = enabled and torch.cuda.is_available()

    def reset(self) -> None:
        if self.enabled:
            import gc

            gc.collect()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.enabled else None


def graph_jobs(resources: dict, methods=METHODS):
    """Per asset, a job materializing just that asset and a job running just its checks (if it has any). Model
    assets of methods not in ``methods`` are left out (the concept does not request them)."""
    import dagster as dg

    from assets_pipeline.definitions import ASSETS, CHECKS
    from assets_pipeline.training.methods import get_method

    jobs = []
    checked = {k.asset_key for c in CHECKS for k in c.check_keys}
    left_out = {get_method(m).asset_name for m in METHODS if m not in methods}
    # the materializable assets (concept_folders is observed, by the folder sensor or a batch build)
    for asset in toposorted([a for a in ASSETS if isinstance(a, dg.AssetsDefinition)]):
        name = asset.key.to_user_string()
        if name in left_out:
            continue
        jobs.append((asset, dg.define_asset_job(f"e2e_{name}", dg.AssetSelection.assets(asset.key).without_checks()),
                     dg.define_asset_job(f"e2e_{name}_checks", dg.AssetSelection.checks_for_assets(asset.key))
                     if asset.key in checked else None))
    defs = dg.Definitions(assets=[*ASSETS, *CHECKS], jobs=[j for _, *js in jobs for j in js if j],
                          resources=resources)
    return [(asset, defs.resolve_job_def(job.name), checks and defs.resolve_job_def(checks.name))
            for asset, job, checks in jobs]


def materialize_all(resources: dict, use_gpu: bool, report, methods=METHODS) -> tuple[list[dict], list[dict]]:
    """Each asset in its own run, in topological order; then each asset's checks in a run of their own, so
    per-asset times and memory are the asset's alone, and a run cut short has measured the assets first.
    ``report(rows, checks)`` is called after every run (the JSON is rewritten as the run goes)."""
    from assets_pipeline.assets.models import MODEL_ASSETS
    from assets_pipeline.cli import _QUIET, _instance
    from assets_pipeline.partitions.definitions import concepts_partitions

    instance = _instance()
    instance.add_dynamic_partitions(concepts_partitions.name, [CONCEPT])
    memory = GpuMemory(use_gpu)
    model_keys = {a.key for a in MODEL_ASSETS}
    jobs = graph_jobs(resources, methods)
    rows, checks = [], []
    for asset, job, _ in jobs:
        name = asset.key.to_user_string()
        if any(r["status"] != "ok" for r in rows):
            rows.append({"asset": name, "status": "not run"})
            continue
        memory.reset()
        t0 = time.perf_counter()
        res = job.execute_in_process(instance=instance, partition_key=CONCEPT, run_config=_QUIET,
                                     raise_on_error=False)
        row = {"asset": name, "status": "ok" if res.success else "FAILED", "run_s": time.perf_counter() - t0,
               "step_s": sum(step_seconds(instance, res.run_id).values()), "peak_gpu_gib": memory.peak_gib(),
               "run_id": res.run_id}
        mats = [e.materialization for e in res.get_asset_materialization_events()]
        md = {k: getattr(v, "value", v) for m in mats for k, v in m.metadata.items()}
        row["rows"] = md.get("dagster/row_count")
        if asset.key in model_keys:
            row["trainer"] = {k: md.get(k) for k in TRAINER_KEYS}
        if not res.success:
            row["errors"] = run_errors(res)
        elif not mats:
            row["status"] = "not materialized"
        rows.append(row)
        print(_asset_line(row), flush=True)
        report(rows, checks)
    done = {r["asset"] for r in rows if r["status"] == "ok"}
    for asset, _, checks_job in jobs:
        if checks_job is not None and asset.key.to_user_string() in done:
            checks += run_checks(checks_job, asset, instance, memory)
            report(rows, checks)
    return rows, checks


def run_checks(job, asset, instance, memory) -> list[dict]:
    from assets_pipeline.cli import _QUIET

    memory.reset()
    # A checks-only selection has no partitioned asset to validate a partition_key against (Dagster refuses
    # it); the partition tag alone is what the checks' context.partition_key reads.
    res = job.execute_in_process(instance=instance, tags={"dagster/partition": CONCEPT}, run_config=_QUIET,
                                 raise_on_error=False)
    seconds = step_seconds(instance, res.run_id)
    out = [{"asset": e.asset_key.to_user_string(), "check": e.check_name, "passed": bool(e.passed),
            "severity": e.severity.value, "peak_gpu_gib": memory.peak_gib(),
            "step_s": next((s for k, s in seconds.items() if k.endswith(e.check_name)), None)}
           for e in res.get_asset_check_evaluations()]
    name = asset.key.to_user_string()
    for err in run_errors(res):  # a check that raised has no evaluation: report it as failed
        step = err.split(":")[0]  # the step key is "<asset>_<check>"
        out.append({"asset": name, "check": step.removeprefix(f"{name}_"), "passed": False, "severity": "ERROR",
                    "error": err})
    for c in out:
        print(f"    check {c['check']:<32} {'passed' if c['passed'] else 'FAILED (' + c['severity'] + ')'}",
              flush=True)
    return out


# -- reporting ------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _asset_line(row: dict) -> str:
    return f"  {row['asset']:<28} {row['status']:<8} {_fmt(row.get('step_s'), '.1f'):>7} s"


def table(rows: list[dict], checks: list[dict]) -> str:
    head = f"{'asset':<28} {'status':<9} {'wall s':>8} {'run s':>7} {'peak GPU GiB':>13} {'train img/s':>12} " \
           f"{'train s':>8} {'warmup s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        trainer = r.get("trainer") or {}
        # Model assets train in a subprocess: its own peak is the one that matters (this process only waits).
        peak = trainer.get("peak_mem_gib") if "trainer" in r else r.get("peak_gpu_gib")
        lines.append(f"{r['asset']:<28} {r['status']:<9} {_fmt(r.get('step_s'), '.1f'):>8} "
                     f"{_fmt(r.get('run_s'), '.1f'):>7} {_fmt(peak):>13} "
                     f"{_fmt(trainer.get('images_per_s')) if 'trainer' in r else '':>12} "
                     f"{_fmt(trainer.get('train_s'), '.1f') if 'trainer' in r else '':>8} "
                     f"{_fmt(trainer.get('warmup_s'), '.1f') if 'trainer' in r else '':>9}")
        lines += [f"    {e}" for e in r.get("errors", [])]
    lines += ["", f"{'asset check':<62} {'result':<14} {'s':>6}"]
    for c in checks:
        result = "passed" if c["passed"] else f"FAILED ({c['severity']})"
        lines.append(f"{c['asset'] + '.' + c['check']:<62} {result:<14} {_fmt(c.get('step_s'), '.1f'):>6}")
        if c.get("error"):
            lines.append(f"    {c['error']}")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------------
def isolate(workdir: Path) -> dict[str, Path]:
    """Point every root and library cache into ``workdir``; the trainer subprocesses inherit this."""
    paths = {name: workdir / name for name in ("data", "artifacts", "dagster_home", "cache")}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(paths["dagster_home"])
    settings = paths["dagster_home"] / "dagster.yaml"  # a throwaway instance: no telemetry, no banner
    if not settings.is_file():
        settings.write_text("telemetry:\n  enabled: false\n")
    cache = paths["cache"]
    for var, sub in (("XDG_CACHE_HOME", ""), ("HF_HOME", "huggingface"), ("TORCH_HOME", "torch"),
                     ("MPLCONFIGDIR", "matplotlib"), ("TRITON_CACHE_DIR", "triton"), ("TMPDIR", "tmp")):
        os.environ[var] = str(cache / sub)
    (cache / "tmp").mkdir(exist_ok=True)
    tempfile.tempdir = str(cache / "tmp")  # Dagster Pipes' message files; gettempdir() may already be cached
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM"):
        os.environ.setdefault(var, "false" if var == "TOKENIZERS_PARALLELISM" else "1")
    # The trainer runs as `python -m assets_pipeline.training`: make the package importable without an install.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return paths


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(PROFILES), default="sd15", help="base model architecture")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where every model runs (auto: CUDA when present)")
    p.add_argument("--workdir", type=Path, default=REPO / "gpu_e2e_run",
                   help="data root, artifact root, DAGSTER_HOME and caches (reused: the base model is built once)")
    p.add_argument("--save-dtype", choices=["fp32", "fp16"], default="fp32",
                   help="dtype of the saved sd15/sdxl model (fp32: a real checkpoint's size, 4 GiB for SD 1.5 and "
                        "13 GiB for SDXL; fp16: half)")
    p.add_argument("--photos", type=int, default=None, help=f"photos in the concept (3-{len(PHOTOS)})")
    p.add_argument("--steps", type=int, default=None, help="max_train_steps of every method (overrides the profile)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="the training methods the concept requests; their model assets are materialized, the others' "
                        "left out (default: all four)")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto")
    p.add_argument("--json-out", type=Path, default=None, help="also write the summary as JSON here")
    args = p.parse_args(argv)
    if args.photos is not None and not 3 <= args.photos <= len(PHOTOS):
        p.error(f"--photos must be within 3..{len(PHOTOS)}")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.shapes == "tiny":
        # Tiny models: OpenMP thread handoffs cost more than the matmuls, and on a busy 2-core machine spin-waiting
        # threads made every op ~100x slower. Set before torch is imported; the trainer subprocesses inherit it.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    problems = check_dependencies(need_cuda=args.shapes != "tiny" and args.device != "cpu")
    if problems:
        print("gpu_e2e cannot run; missing:\n  " + "\n  ".join(problems) + "\n" + INSTALL_HELP,
              file=sys.stderr)
        return 2
    import torch

    from assets_pipeline.models.embedded import RESOLUTION

    t_start = time.perf_counter()
    workdir = args.workdir.resolve()
    paths = isolate(workdir)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    profile = {**PROFILES[args.shapes], "resolution": RESOLUTION[args.shapes]}
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    print(f"gpu_e2e: shapes {args.shapes}, device {device}{f' ({gpu})' if gpu else ''}, torch {torch.__version__}, "
          f"workdir {workdir}")

    from assets_pipeline.definitions import default_resources
    from assets_pipeline.resources import AcceleratorResource, BaseModelResource, PipelineStorage, TrainerLauncher

    save_dtype = args.save_dtype if args.shapes != "tiny" else "fp32"  # the embedded model is saved in fp32
    source, model_dir, build_s = ensure_base_model(workdir, paths["artifacts"], args.shapes, save_dtype, device)
    print(f"base model: {model_dir} ({save_dtype}, {folder_gib(model_dir):.2f} GiB; "
          + (f"built and saved in {build_s:.1f} s)" if build_s else "reused)"))
    n_photos = args.photos or profile["photos"]
    concept_dir = write_concept(paths["data"], profile, n_photos, args.steps, args.methods)
    print(f"concept: {concept_dir} ({n_photos} photos, shorter side {profile['short_side']} px)\n")
    resources = {
        **default_resources(),
        "storage": PipelineStorage(data_root=str(paths["data"]), artifact_root=str(paths["artifacts"])),
        "base_model": BaseModelResource(source=source, resolution=profile["resolution"]),
        "accelerator": AcceleratorResource(device=device, mixed_precision=args.mixed_precision),
        "trainer": TrainerLauncher(device=device, mixed_precision=args.mixed_precision),
    }
    summary = {"complete": False, "success": False, "shapes": args.shapes, "device": device, "gpu": gpu,
               "torch": torch.__version__, "save_dtype": save_dtype, "base_model": str(model_dir),
               "base_model_gib": folder_gib(model_dir), "base_model_build_s": build_s, "photos": n_photos,
               "resolution": profile["resolution"], "methods": args.methods}

    def report(rows, checks, **final):
        summary.update(assets=rows, checks=checks, total_s=time.perf_counter() - t_start, **final)
        if args.json_out:  # rewritten after every run: a run cut short still leaves what it measured
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(summary, indent=2, default=str) + "\n")

    rows, checks = materialize_all(resources, device == "cuda", report, args.methods)
    success = all(r["status"] == "ok" for r in rows) and all(c["passed"] for c in checks)
    report(rows, checks, complete=True, success=success)
    print("\n" + table(rows, checks))
    print(f"\n{'OK' if success else 'FAILED'}: {len(rows)} assets, {len(checks)} checks in {summary['total_s']:.0f} s "
          f"(base model build {build_s:.0f} s). Open the runs: DAGSTER_HOME={paths['dagster_home']} dagster dev")
    return 0 if success else 1


if __name__ == "__main__":
    sys.exit(main())
