"""Overhead around the work: a whole LoRA build through Dagster versus diffusers' own training script.

Same tiny base model (the embedded SD saved as a plain diffusers folder, so nothing takes the embedded model's
shortcuts), same photos, same steps and batch. Prints one JSON line per measurement, then a summary:

- ``script``: ``examples/dreambooth/train_dreambooth_lora.py`` from a diffusers checkout, as a whole process
  (``--diffusers-repo``; skipped when absent). Its ``check_min_version`` line is dropped: the checkout may be
  newer than the installed wheel.
- ``build``: ``dagster asset materialize --select '*lora_adapter'`` for a new concept, from scratch (fresh
  instance, fresh artifact root: every item computed), as a user's run from the UI or CLI executes it: the
  job's executor (``--executor``: ``$ASSETS_PIPELINE_EXECUTOR``, in_process or forkserver), a run worker
  process, the trainer through Pipes, then the asset checks.
- ``noop``: the same command again with nothing changed (every asset reuses its caches, the model its output).
- ``per_step``: each step's wall time in the build, from the run's event log.

    python benchmarks/bench_overhead.py --diffusers-repo /path/to/diffusers/.git --photos 6 --steps 100 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # gpu_e2e.step_seconds reads a run's step times
CONCEPT = "overhead"


def _env(work: Path, executor: str) -> dict:
    return {**os.environ, "ASSETS_PIPELINE_EXECUTOR": executor, "DAGSTER_HOME": str(work / "dagster_home"),
            "ASSETS_PIPELINE_DATA": str(work / "data"), "ASSETS_PIPELINE_ARTIFACTS": str(work / "artifacts"),
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _setup(work: Path, photos: int, steps: int, batch: int) -> Path:
    """Photos, concept.toml, the base model as a folder, a fresh instance with the partition registered."""
    import dagster as dg

    from assets_pipeline.models.embedded import build_pipeline
    from assets_pipeline.demo_data import GOOD_PHOTOS, demo_files
    from assets_pipeline.partitions.definitions import concepts_partitions

    folder = work / "data" / CONCEPT
    folder.mkdir(parents=True)
    files = demo_files()
    for name in GOOD_PHOTOS[:photos]:  # the demo's six good photos (real photos shipped in wheels)
        (folder / name).write_bytes(files[name])
    (folder / "concept.toml").write_text(
        f'token = "sks"\nclass_noun = "thing"\nmethods = ["lora"]\n\n'
        f"[lora]\nmax_train_steps = {steps}\ntrain_batch_size = {batch}\n")
    base = work / "base"
    build_pipeline("tiny").save_pretrained(base, safe_serialization=True)
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(concepts_partitions.name, [CONCEPT])
    return base


def _materialize(work: Path, base: Path, executor: str) -> float:
    config = {"resources": {"base_model": {"config": {"source": str(base), "resolution": 64}}}}
    cmd = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "assets_pipeline.definitions",
           "--select", "*lora_adapter", "--partition", CONCEPT, "--config-json", json.dumps(config)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=_env(work, executor), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"materialize failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return wall


def _per_step(work: Path) -> dict[str, float]:
    """Wall time of each step of the newest run (STEP_START to its end, from the event log) and of the run."""
    import dagster as dg
    from gpu_e2e import step_seconds

    with dg.DagsterInstance.from_config(str(work / "dagster_home")) as instance:
        run = instance.get_runs(limit=1)[0]
        times = {k: round(v, 2) for k, v in step_seconds(instance, run.run_id).items()}
        records = instance.all_logs(run.run_id)
        times["run_total"] = round(records[-1].timestamp - records[0].timestamp, 2)
    return times


def _script(work: Path, repo: Path, base: Path, steps: int, batch: int) -> float:
    src = subprocess.run(["git", "--git-dir", str(repo), "show", "HEAD:examples/dreambooth/train_dreambooth_lora.py"],
                         capture_output=True, text=True, check=True).stdout
    script = work / "train_dreambooth_lora.py"
    script.write_text(re.sub(r"^check_min_version\(.*\)$", "", src, flags=re.M))
    photos = work / "script_photos"
    photos.mkdir()
    for p in sorted(p for p in (work / "data" / CONCEPT).iterdir() if p.suffix != ".toml"):
        shutil.copy(p, photos / p.name)
    cmd = [sys.executable, str(script), "--pretrained_model_name_or_path", str(base), "--instance_data_dir",
           str(photos), "--instance_prompt", "a photo of sks thing", "--resolution", "64", "--train_batch_size",
           str(batch), "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--seed", "0",
           "--output_dir", str(work / "script_out"), "--mixed_precision", "no", "--checkpointing_steps", "100000"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"diffusers script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusers-repo", type=Path, help="a diffusers git directory (bare or .git)")
    ap.add_argument("--photos", type=int, default=6, help="how many of the demo's 6 good photos")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--executor", default="in_process",
                    help="$ASSETS_PIPELINE_EXECUTOR: in_process (the default), forkserver")
    ap.add_argument("--workdir", type=Path, help="kept afterwards (default: a temporary folder, removed)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = _setup(work, args.photos, args.steps, args.batch)
        result = {"photos": args.photos, "steps": args.steps, "batch": args.batch, "executor": args.executor}
        if args.diffusers_repo:
            result["script_s"] = round(_script(work, args.diffusers_repo, base, args.steps, args.batch), 1)
            print(json.dumps({"measure": "script", "wall_s": result["script_s"]}), flush=True)
        wall = _materialize(work, base, args.executor)
        result["build_s"] = round(wall, 1)
        print(json.dumps({"measure": "build", "wall_s": result["build_s"], "per_step": _per_step(work)}), flush=True)
        wall = _materialize(work, base, args.executor)
        result["noop_s"] = round(wall, 1)
        print(json.dumps({"measure": "noop", "wall_s": result["noop_s"], "per_step": _per_step(work)}), flush=True)
        if "script_s" in result:
            result["build_over_script"] = round(result["build_s"] / result["script_s"], 2)
        print(json.dumps({"summary": result}))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
