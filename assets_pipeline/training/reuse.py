"""Reuse of a finished output: a training whose job identity equals the current output's is not run again.

A model asset asks :func:`find_reusable` before it launches the trainer. The current output is reused when it
was trained from the same job identity (method, resolved config, base model fingerprint, the exact training
rows and captions) by the same code version, and its weights still match the digests written beside them.
Anything else (another identity, an older code version, a damaged or incomplete folder, an output a blocking
check failed on) trains again, and the reason is logged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assets_pipeline.display import shown_metadata
from assets_pipeline.hashing import digest, sha256_file
from assets_pipeline.lineage import CURRENT_FILE, LINEAGE_FILE, current_version
from assets_pipeline.store import ArtifactLayout
from assets_pipeline.training.job import TrainJob

FORCE_RETRAIN_TAG = "assets_pipeline/force_retrain"
CURRENT = CURRENT_FILE  # {"path": <version folder name>}: the asset's current output among kept versions
# Files training/output.py writes into every output folder.
METRICS_FILE = "metrics.json"
SUMS_FILE = "SHA256SUMS"  # whole-file digests of the weights, in `sha256sum -c` format
CHECKS_FAILED = "checks_failed.json"  # {check name: {run_id, metadata}}: blocking checks this output failed
LOSS_PLOT = "loss.png"
GRID_FILE = "validation/grid.png"  # every validation prompt and seed, base vs trained, labeled
# The key numbers a reused materialization repeats, so Dagster's plots across materializations stay continuous.
KEY_NUMBERS = ("clip_t", "clip_i", "mean_abs_change_vs_base", "final_loss", "steps", "lineage_sha256",
               "scorer_is_random")


@dataclass(frozen=True)
class Reuse:
    path: Path
    lineage: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def data_version(self) -> str:
        """The same data version the trainer reported for this output (a digest of its weights' tensors)."""
        return digest(self.lineage["weights"])


def current_output(layout: ArtifactLayout, concept: str, asset_name: str) -> Path | None:
    """The version folder an asset's ``current.json`` names, or None before its first output; a damaged one is
    :class:`~assets_pipeline.store.UnreadableFile` naming it and what to do (``lineage.current_version``)."""
    return current_version(layout.asset_dir(concept, asset_name))


def force_requested(tags: dict[str, str]) -> bool:
    value = tags.get(FORCE_RETRAIN_TAG)
    if value is None:
        return False
    if value.strip().lower() not in ("true", "false"):
        raise ValueError(f"run tag {FORCE_RETRAIN_TAG}={value!r}: expected 'true' or 'false'")
    return value.strip().lower() == "true"


def find_reusable(out: Path | None, job: TrainJob, code_version: str) -> tuple[Reuse | None, str]:
    """(the reusable output, why) or (None, why it must train)."""
    if out is None:
        return None, "no current output"
    try:
        lineage = json.loads((out / LINEAGE_FILE).read_text())
        metrics = json.loads((out / METRICS_FILE).read_text())
        sums = dict(reversed(line.split("  ", 1)) for line in (out / SUMS_FILE).read_text().splitlines() if line)
    except (OSError, ValueError) as e:
        return None, f"current output {out} is incomplete or unreadable ({e})"
    if (out / CHECKS_FAILED).is_file():
        failed = read_failed_checks(out)
        return None, (f"blocking check(s) {', '.join(sorted(failed))} failed on {out} (run "
                      f"{', '.join(sorted({str(v.get('run_id')) for v in failed.values()}))}): never reused")
    if lineage.get("job_identity") != job.identity():
        return None, "training inputs changed"  # rows, captions, resolved config or base model
    if lineage.get("code_version") != code_version:
        return None, f"trained by code version {lineage.get('code_version')!r}, now {code_version!r}"
    if set(sums) != set(lineage.get("weights", {})):
        return None, f"{out / SUMS_FILE} does not list exactly the weights in {LINEAGE_FILE}"
    for rel, expected in sorted(sums.items()):
        path = out / rel
        if not path.is_file() or sha256_file(path) != expected:
            return None, f"current output's {path} is missing or damaged (sha256 differs from {SUMS_FILE})"
    return Reuse(out, lineage, metrics), f"identical job already trained by run {lineage.get('run_id')}"


def read_failed_checks(out: Path) -> dict[str, dict]:
    """The blocking checks recorded as failed on an output (:func:`record_failed_check`). A damaged record still
    marks the output as failed: it only loses the detail."""
    from assets_pipeline.store import UnreadableFile, read_json

    path = out / CHECKS_FAILED
    if not path.exists():
        return {}
    try:
        failed = read_json(path, "the output stays marked; delete the version folder to discard it")
    except UnreadableFile as e:
        return {f"(unreadable {path}: {e.why})": {}}
    if not all(isinstance(v, dict) for v in failed.values()):
        return {f"(unreadable {path}: not an object of check records)": {}}
    return failed


def record_failed_check(out: Path, check: str, run_id: str, metadata: dict[str, Any]) -> None:
    """Mark ``out`` as failed by the blocking ``check``: reuse never takes it again (the job trains anew)."""
    from assets_pipeline.store import write_json_atomic

    failed = {k: v for k, v in read_failed_checks(out).items() if not k.startswith("(unreadable")}
    write_json_atomic(out / CHECKS_FAILED, {**failed, check: {"run_id": run_id, "metadata": metadata}})


def find_reusable_version(asset_dir: Path, job: TrainJob, code_version: str, skip: Path | None) -> Reuse | None:
    """An intact output of the same job and code among the asset's kept version folders, newest first, other
    than ``skip`` (the current one, already asked): a deleted or re-pointed ``current.json`` does not cost a
    training while an identical output is on disk. Versions whose weights were pruned are not intact."""
    if not asset_dir.is_dir():
        return None
    versions = sorted((p for p in asset_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p != skip),
                      key=lambda p: p.name, reverse=True)  # folder names start with their UTC timestamp
    for folder in versions:
        reuse, _ = find_reusable(folder, job, code_version)
        if reuse is not None:
            return reuse
    return None


def reuse_metadata(reuse: Reuse) -> dict[str, Any]:
    """Materialization metadata for a reused output besides its views: which run trained it, its key numbers
    (rounded for display, as the trainer reported them)."""
    speed = reuse.metrics.get("training_speed") or {}
    return shown_metadata({
        "reused": True,
        "reused_from_run_id": reuse.lineage.get("run_id"),
        **{k: reuse.metrics[k] for k in KEY_NUMBERS if reuse.metrics.get(k) is not None},
        **({"images_per_s": speed["images_per_s"]} if speed.get("images_per_s") is not None else {}),
        "dagster/row_count": len(reuse.lineage.get("training_images", [])),
    })


def output_views(out: Path, grid_md: str | None = None) -> dict[str, tuple[str, Any]]:
    """How an output folder shows in the Dagster UI, as (kind, value) pairs (kind ``md`` or ``path``): the loss
    curve and the labeled validation grid as images, and where the files are. The trainer reports them through
    Pipes; a reused output repeats them."""
    from assets_pipeline.imaging import image_markdown

    views: dict[str, tuple[str, Any]] = {"path": ("path", str(out)), "lineage": ("path", str(out / LINEAGE_FILE))}
    if (out / LOSS_PLOT).is_file():
        views["loss_curve"] = ("md", image_markdown(out / LOSS_PLOT, "training loss per step"))
        views["loss_curve_path"] = ("path", str(out / LOSS_PLOT))
    if grid_md is None and (out / GRID_FILE).is_file():
        grid_md = image_markdown(out / GRID_FILE, "validation: base vs trained, per prompt and seed",
                                 max_side=1280, jpeg_quality=85)
    if grid_md is not None:
        views["preview"] = ("md", grid_md)
        views["validation_grid_path"] = ("path", str(out / GRID_FILE))
    return views
