"""The trained output folder: weights (safetensors), lineage manifest, validation images, CLIP-T/CLIP-I, loss.

Written into a temporary sibling and renamed into place, so a folder that exists is complete.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from assets_pipeline.hashing import digest, sha256_file
from assets_pipeline.lineage import LINEAGE_FILE
from assets_pipeline.models.load import base_pipeline_loader
from assets_pipeline.store import share_files, write_json_atomic
from assets_pipeline.training.checkpoints import TRACKER_RUN, checkpoint_root
from assets_pipeline.training.job import TrainJob
from assets_pipeline.training.loop import TrainState
from assets_pipeline.training.render import BaseRenders, pixel_change, render_batch
from assets_pipeline.training.reuse import GRID_FILE, LOSS_PLOT, METRICS_FILE, SUMS_FILE
from assets_pipeline.training.runtime import PROFILE_DIR
from assets_pipeline.training.validation import (
    BEST_DIR, job_scorer, training_photos, validation_pairs, write_step_validations,
)


def stamp_safetensors(path: Path, extra: dict[str, str]) -> None:
    """Add ``extra`` to a safetensors header, keeping its tensors and existing metadata (e.g. format=pt)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={**meta, **extra})
    tmp.replace(path)


def tensors_digest(path: Path) -> str:
    """sha256 over a safetensors file's tensors (names, dtypes, shapes, bytes), not its header: the manifest
    names the weights by this, since the header then receives the manifest's own digest."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# The version of the manifest's "reproduction" section (what `assets-pipeline reproduce` reads).
REPRODUCTION_FORMAT = 1


def _stored(path: str | None, artifact_root: Path | None) -> str | None:
    """A file the job names, as the manifest records it: relative to the artifact root (which can move)."""
    if not path or artifact_root is None:
        return path or None
    try:
        return Path(path).resolve().relative_to(artifact_root.resolve()).as_posix()
    except ValueError:
        return path


def reproduction_record(job: TrainJob, state: TrainState) -> dict[str, Any]:
    """What the manifest records so that the output can be trained again from it alone (``assets-pipeline
    reproduce``, training/reproduce.py), besides what it lists for the audit: the job's settings that are not in
    the method's config, the base model as resolved, each row's decoded image and cache keys (in the order of
    ``training_images``), the precision it trained in, and the code that trained it."""
    from assets_pipeline.training.plan import code_identity

    root = Path(job.cache_dir).parent if job.cache_dir else None
    return {
        "format": REPRODUCTION_FORMAT,
        "base_model": asdict(job.base_model),
        "job": {"token": job.token, "class_noun": job.class_noun,
                "mixed_precision": state.stats.get("precision") or job.mixed_precision,
                "trained_on": state.stats.get("device"),
                "performance": job.performance.to_dict(),
                "validation_inference_steps": job.validation_inference_steps,
                "validation_seeds": list(job.validation_seeds),
                "scorer": {k: v for k, v in job.scorer.items() if k != "artifact_root"}},
        "rows": [{"image_sha256": r.image_sha256, "decoded": _stored(r.decoded_path, root),
                  "latent_key": r.latent_key, "text_key": r.text_key, "control": _stored(r.control_path, root)}
                 for r in job.training_images],
        "code": code_identity(),
    }


def lineage_manifest(job: TrainJob, state: TrainState, weights: list[Path], root: Path) -> dict[str, Any]:
    return {
        **job.lineage,
        "concept": job.concept,
        "method": job.method,
        "method_config": asdict(job.config),
        "steps": state.steps,
        "resumed_from_step": state.resumed_from,
        "num_processes": state.num_processes,  # data-parallel processes (GPUs); the effective batch is the config's
        "base_model": job.base_model.describe(),
        "job_identity": job.identity(),
        "training_images": [
            {k: v for k in ("image_sha256", "role", "caption", "source_path", "clip_score", "blur_variance",
                            "concept", "repeats",  # concept, repeats: with datasets (LoRA's [[lora.datasets]])
                            "control_sha256", "control_source")  # ControlNet: the other half of the pair
             if (v := getattr(r, k)) is not None}
            for r in job.training_images
        ],
        # Only with held-out pairs (ControlNet): photo and conditioning image of each, validated on, not trained on.
        **({"validation_pairs": [
            {k: v for k in ("image_sha256", "caption", "source_path", "control_sha256", "control_source")
             if (v := getattr(r, k)) is not None} for r in job.validation_pairs]} if job.validation_pairs else {}),
        # Only with datasets: the other concepts trained in (each row above names the concept it came from).
        **({"datasets": [{"concept": d.concept, "token": d.token, "class_noun": d.class_noun, "repeats": d.repeats}
                         for d in job.datasets]} if job.datasets else {}),
        "weights": {p.relative_to(root).as_posix(): {"tensors_sha256": tensors_digest(p)} for p in weights},
        # Only with validation_steps, so an output trained without it has exactly the manifest it had before.
        **({"validation_during_training": {
            "every": state.validation["every"], "select_best": state.validation["select_best"],
            "selected_step": (state.validation["best"] or {}).get("step")}} if state.validation else {}),
        "reproduction": reproduction_record(job, state),
    }


def _loss_curve(losses: list[float], out: Path) -> None:
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows(enumerate(losses, start=1))
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="lightsteelblue", linewidth=1, label="per step")
    if len(losses) >= 10:  # diffusion losses are noisy per step (random timesteps): the trend is the average
        window = max(5, len(losses) // 20)
        trend = pd.Series(losses).rolling(window, min_periods=1).mean()
        ax.plot(steps, trend, color="navy", linewidth=1.5, label=f"mean of last {window}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if losses:
        ax.set_title(f"{len(losses)} steps, final loss {losses[-1]:.4f}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / LOSS_PLOT)
    plt.close(fig)


def validate(job: TrainJob, state: TrainState, out: Path, device: str) -> dict[str, Any]:
    """Validation images for fixed prompts and seeds, compared with the base model's images for the same
    prompts and seeds, and scored: CLIP-T (image-prompt cosine) and CLIP-I (mean pairwise cosine between
    generated and training images), the DreamBooth paper's metrics (Ruiz et al. 2022, section 4.1). Every image
    is rendered in one batch (the base model's come from the cache after the first training on it)."""
    import numpy as np
    from PIL.Image import Image as PILImage

    method, ctx = state.method, state.ctx
    base = BaseRenders(job.base_model, device,
                       BaseRenders.cache_for(Path(job.cache_dir).parent) if job.cache_dir else None)
    vdir = out / "validation"
    vdir.mkdir()
    # per_image: e.g. ControlNet's conditioning image per render
    pairs, per_image = validation_pairs(method, ctx, job.validation_seeds, out)
    names = [f"p{i // len(job.validation_seeds)}_seed{seed}" for i, (_, seed) in enumerate(pairs)]
    refs = base(pairs, ctx.resolution, job.validation_inference_steps)  # first: they need the untouched base
    # The base pipeline the renders above loaded (on a cache miss) is the one the output is applied to, not a
    # second load from disk; a method that builds its own pipeline (DreamBooth's folder) never calls it.
    load_base = base.take_pipe()
    pipe = method.load_pipeline(load_base, out, ctx).to(device)
    images = render_batch(pipe, pairs, ctx.resolution, job.validation_inference_steps, **per_image)
    # A render's conditioning image (ControlNet's: the concept's own, or its annotator's), shown beside it
    conditions = [next((v[i] for v in per_image.values() if isinstance(v[i], PILImage)), None)
                  for i in range(len(pairs))]
    grid: dict[str, list] = {}
    for (prompt, seed), name, img, ref, cond in zip(pairs, names, images, refs, conditions):
        img.save(vdir / f"{name}.png")
        ref.save(vdir / f"{name}_base.png")
        tiles = [(f"base, seed {seed}", ref), (f"trained, seed {seed}", img)]
        if cond is not None:
            cond.save(vdir / f"{name}_conditioning.png")
            tiles.insert(0, (f"conditioning, seed {seed}", cond))
        grid.setdefault(prompt, []).extend(tiles)
    diffs = [pixel_change(img, ref) for img, ref in zip(images, refs)]
    prompts = [p for p, _ in pairs]
    scorer = job_scorer(job, device)
    train_imgs = training_photos(job)
    clip_t = float(scorer.score(images, prompts).mean())
    clip_i = float((scorer.embed_images(images) @ scorer.embed_images(train_imgs).T).mean())
    return {
        "clip_t": clip_t, "clip_i": clip_i, "scorer_is_random": scorer.is_random,
        "base_renders_cached": base.cache.cached if base.cache else 0,
        "mean_abs_change_vs_base": float(np.mean(diffs)),
        "validation_prompts": sorted(set(prompts)), "validation_seeds": list(job.validation_seeds),
        "preview_md": _validation_grid(list(grid.items()), out / GRID_FILE),
    }


def _validation_grid(rows, path: Path) -> str:
    """Base and trained renders side by side (after ControlNet's conditioning image), a row per prompt, each
    labeled: saved as ``validation/grid.png``
    and returned as Markdown for the materialization (JPEG there, to keep the event small)."""
    from assets_pipeline.imaging import image_markdown, labeled_grid

    sheet = labeled_grid(rows, tile=256)
    sheet.save(path)
    return image_markdown(sheet, "validation: base vs trained, per prompt and seed", max_side=1280, jpeg_quality=85)


def write_output(job: TrainJob, state: TrainState, device: str) -> dict[str, Any]:
    final = Path(job.output_dir)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if best := (state.validation or {}).get("best"):  # select_best: the chosen step's saved output
            shutil.copytree(Path(state.validation["folder"]) / BEST_DIR, tmp, dirs_exist_ok=True)
            weights = [tmp / w for w in best["weights"]]
        else:
            weights = state.method.save(state.models, base_pipeline_loader(job.base_model), tmp, state.cfg,
                                        state.ctx)
        manifest = lineage_manifest(job, state, weights, tmp)
        write_json_atomic(tmp / LINEAGE_FILE, manifest)
        lineage_digest = sha256_file(tmp / LINEAGE_FILE)
        for w in weights:  # the manifest's digest travels inside every weights file
            stamp_safetensors(w, {"lineage_sha256": lineage_digest, "concept": job.concept, "method": job.method})
        # Whole-file digests, final bytes included, in `sha256sum -c` format.
        (tmp / SUMS_FILE).write_text("".join(f"{sha256_file(w)}  {w.relative_to(tmp).as_posix()}\n"
                                                for w in weights))
        _loss_curve(state.losses, tmp)
        if (logs := checkpoint_root(job) / TRACKER_RUN).is_dir():  # the tracker's logs, when one was asked for
            shutil.copytree(logs, tmp / TRACKER_RUN)
        if state.stats.get("profile"):  # performance.profile_steps' trace of this run
            shutil.copytree(checkpoint_root(job) / PROFILE_DIR, tmp / PROFILE_DIR)
        metrics = validate(job, state, tmp, device)
        preview = metrics.pop("preview_md")
        if state.validation:
            metrics.update(write_step_validations(state.validation, tmp))
        metrics.update(final_loss=state.losses[-1] if state.losses else None, steps=state.steps,
                       training_speed=state.stats,
                       lineage_sha256=lineage_digest,
                       weights_version=digest(manifest["weights"]))
        write_json_atomic(tmp / METRICS_FILE, metrics)
        if final.exists():
            shutil.rmtree(final)
        share_files(tmp)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {**metrics, "preview_md": preview, "weights": [str(final / w.relative_to(tmp)) for w in weights]}


SPEED_KEYS = ("images_per_s", "warmup_s", "train_s", "peak_mem_gib", "denoiser_gib", "micro_batch",
              "gradient_accumulation", "compile", "compile_cache", "compile_cache_io_s", "cudnn_benchmark",
              "attention", "num_processes", "pack_size")


def _images_table(job) -> str:
    """The training images as a Markdown table for the UI (the full list is in lineage.json)."""
    rows = [f"| {r.role} | {job.row_source(r)[0] + '/' if job.datasets else ''}{r.source_path} | "
            f"{r.image_sha256[:12]} | {r.caption} |" for r in job.training_images[:50]]
    more = len(job.training_images) - len(rows)
    return "\n".join(["| role | source | sha256 | caption |", "|---|---|---|---|", *rows]) + (
        f"\n\n_and {more} more_" if more > 0 else "")


def materialization_metadata(job, state, result: dict) -> dict:
    """What the model asset's materialization shows of a finished training: the output's views, its key numbers
    (rounded for display: metrics.json keeps them whole) and the training's speed."""
    from assets_pipeline.display import shown_metadata
    from assets_pipeline.training.reuse import output_views
    from assets_pipeline.training.validation import step_views

    return {
        **{k: {"raw_value": v, "type": t}
           for k, (t, v) in output_views(Path(job.output_dir), result["preview_md"]).items()},
        # validation_steps: the strips per step and the chosen step's numbers (none without it)
        **{k: {"raw_value": v, "type": t} for k, (t, v) in step_views(Path(job.output_dir)).items()},
        "training_images": {"raw_value": _images_table(job), "type": "md"},
        **shown_metadata({
            **{k: result[k] for k in ("clip_t", "clip_i", "mean_abs_change_vs_base", "final_loss", "steps",
                                      "lineage_sha256", "scorer_is_random")},
            "resumed_from_step": state.resumed_from,
            "base_model_family": job.base_model.family,
            "reused": False,
            # Speed of this training (None where not measured, e.g. a run of one step).
            **{k: v for k, v in state.stats.items() if k in SPEED_KEYS and v is not None},
            # Trained in a pack (training/pack.py): the concepts it shared its steps with.
            **({"packed_with": ", ".join(state.stats["packed_with"])} if state.stats.get("packed") else {}),
        }),
        "dagster/row_count": len(job.training_images),
    }
