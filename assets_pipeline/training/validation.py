"""Validation during training (``validation_steps``): the final validation's fixed prompts and seeds rendered
with the weights being trained every N optimizer steps, so a person can compare the steps, and optionally the
output's weights taken from the best-scoring step (``select_best``).

One path for every method and model family: the method saves its output for the current weights into a
temporary folder (``method.save``) and stock diffusers loads it back (``method.load_pipeline``), exactly as the
final validation loads the output; no method has a validation code of its own. Each validation costs one save,
one pipeline load and one batch of renders (a DreamBooth step saves a whole pipeline).

While training, everything lives in the checkpoint folder, ``<checkpoints>/validation_steps/``: a folder of images
and a strip per validated step, ``records.json`` (steps, prompts, seeds, files, scores) and, with select_best,
``best/``: the best step's saved output so far. Every checkpoint holds a hard-linked copy of that folder as it
was at its step, so a resumed run keeps the strips of the steps before its checkpoint and the best step so far;
the steps after the checkpoint are validated again. write_output copies the images into the output
(``validation_steps/``, ``validation_steps.json`` and ``.csv``) and, with select_best, ``best/`` as the weights.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from assets_pipeline.display import shown

STEPS_DIR = "validation_steps"  # in the checkpoint folder while training, then in the output
RECORDS = "records.json"
BEST_DIR = "best"
TABLE = "validation_steps.json"  # in the output: what was validated, and the chosen step
TABLE_CSV = "validation_steps.csv"  # one row per image
VALIDATION_SUFFIXES = ("", ", at the beach")  # fixed prompts: the validation prompt, and one new context
MAX_SHEET_ROWS = 12  # steps shown in the UI's sheet (first, last, chosen and evenly between); all are in the folder


# The cost of the final validation, in proportion to the training's: its renders of the trained weights take
# about this share of the U-Net passes the training took, clamped to [MIN, MAX] denoising steps per render.
VALIDATION_SHARE = 0.15
MIN_VALIDATION_STEPS = 10
MAX_VALIDATION_STEPS = 25  # diffusers' training scripts validate with 25 steps of DPM-Solver++ (log_validation)


def validation_inference_steps(images_trained: int, renders: int) -> int:
    """Denoising steps of each validation render, so that validating costs about ``VALIDATION_SHARE`` of the
    training: a trained image costs about 3 U-Net passes (forward and backward), a render 2 per step
    (classifier-free guidance). On 4 renders: a 100-step LoRA at batch 2 gets 11 steps; 445 or more images
    trained (e.g. a usual SD 1.5 LoRA, 600 steps at batch 1) get the full 25 steps."""
    if images_trained < 1 or renders < 1:
        raise ValueError(f"images_trained = {images_trained} and renders = {renders} must both be >= 1")
    steps = int(VALIDATION_SHARE * 3 * images_trained / (2 * renders))
    return max(MIN_VALIDATION_STEPS, min(MAX_VALIDATION_STEPS, steps))


def validation_prompts(method, ctx) -> list[str]:
    """The method's validation prompt for the concept, then for each other concept trained in (its token and
    class noun; once per distinct prompt)."""
    from dataclasses import replace

    prompts = [method.validation_prompt(ctx)]
    for d in ctx.extra.get("datasets", []):
        prompt = method.validation_prompt(replace(ctx, concept=d["concept"], token=d["token"],
                                                  class_noun=d["class_noun"]))
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


def validation_pairs(method, ctx, seeds, out_dir: Path) -> tuple[list[tuple[str, int]], dict[str, list]]:
    """The fixed (prompt, seed) pairs every validation renders, and the per-image pipeline arguments (e.g.
    ControlNet's conditioning image), as lists for :func:`render.render_batch`."""
    pairs, kwargs = [], []
    for prompt in validation_prompts(method, ctx):
        for pi, suffix in enumerate(VALIDATION_SUFFIXES):
            for seed in seeds:
                pairs.append((prompt + suffix, seed))
                kwargs.append(method.validation_kwargs(out_dir, ctx, pi * len(seeds) + seed))
    return pairs, {k: [kw[k] for kw in kwargs] for k in kwargs[0]}


def job_scorer(job, device):
    """The CLIP scorer the job's settings name (ClipScorerResource), for CLIP-T and CLIP-I."""
    from assets_pipeline.stages.scoring import load_clip_scorer

    return load_clip_scorer(job.scorer.get("model_name", "embedded"), job.scorer.get("pretrained"),
                            Path(job.scorer["artifact_root"]), device)


def training_photos(job) -> list:
    """The instance photos CLIP-I compares generated images with."""
    from PIL import Image

    return [Image.open(r.decoded_path).convert("RGB") for r in job.training_images if r.role == "instance"]


def validation_due(cfg, done: int, steps: int) -> bool:
    """Whether optimizer step ``done`` of ``steps`` is validated: every ``validation_steps`` and the last one
    (every process asks: the others wait while the main process validates)."""
    return bool(cfg.validation_steps) and (done % cfg.validation_steps == 0 or done == steps)


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def _link_tree(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose files are hard links (no bytes copied; every file here is written once and
    replaced, never changed in place), or plain copies where the file system has no hard links."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


class StepValidation:
    """The validations of one training run, on the main process (the loop makes the others wait)."""

    def __init__(self, job, method, cfg, ctx, root: Path, device, progress: Callable[[str], None]):
        self.job, self.method, self.cfg, self.ctx = job, method, cfg, ctx
        self.root, self.folder, self.device, self.progress = root, root / STEPS_DIR, device, progress
        self.records: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._scorer = self._train_embeds = None

    def restore(self, checkpoint: Path | None) -> None:
        """The validations as they were at ``checkpoint`` (None: a fresh start). Anything a run validated after
        its last checkpoint is dropped: those steps are trained, and validated, again."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        saved = checkpoint / STEPS_DIR if checkpoint is not None else None
        if saved is not None and (saved / RECORDS).is_file():
            _link_tree(saved, self.folder)
            data = json.loads((self.folder / RECORDS).read_text())
            self.records, self.best = data["steps"], data["best"]
        else:
            self.folder.mkdir(parents=True)
            self.records, self.best = [], None

    def save_into(self, checkpoint_tmp: Path) -> None:
        """Into a checkpoint being written: the validations up to its step (hard links)."""
        _link_tree(self.folder, checkpoint_tmp / STEPS_DIR)

    def __call__(self, models, step: int, ema=None, params=None) -> dict[str, Any]:
        """Validate the weights of ``step``: the output they would give (with use_ema the averaged weights, as
        the output holds) saved, loaded with stock diffusers, rendered for the fixed prompts and seeds."""
        import torch

        from assets_pipeline.store import write_json_atomic
        from assets_pipeline.models.load import base_pipeline_loader, render_dtype
        from assets_pipeline.training.render import render_batch

        load_base = base_pipeline_loader(self.job.base_model, render_dtype())
        snapshot = self.root / f".validation-{step_name(step)}.tmp"  # a crashed run's is removed as stale
        if snapshot.exists():
            shutil.rmtree(snapshot)
        snapshot.mkdir()
        # Rendering must not change what is learned: the pipelines draw their noise from their own generators,
        # and the global RNG (dropout, e.g. LoRA's) is restored after whatever loading and saving drew from it.
        devices = [self.device] if getattr(self.device, "type", str(self.device)) == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            if ema is not None:  # diffusers' scripts validate the EMA weights the same way: store, copy, restore
                ema.store(params)
                ema.copy_to(params)
            try:
                weights = self.method.save(models, load_base, snapshot, self.cfg, self.ctx)
            finally:
                if ema is not None:
                    ema.restore(params)
            pipe = self.method.load_pipeline(load_base, snapshot, self.ctx).to(self.device)
            pairs, kwargs = validation_pairs(self.method, self.ctx, self.job.validation_seeds, snapshot)
            # the job's inference steps per render (cfg.validation_steps: how often to validate)
            images = render_batch(pipe, pairs, self.ctx.resolution, self.job.validation_inference_steps, **kwargs)
            del pipe
        record = self._write_images(step, pairs, images)
        metric = self.cfg.select_best
        if metric != "none":
            self._score(record, images, [p for p, _ in pairs])
        if metric != "none" and (self.best is None or record[metric] > self.best["score"]):
            if (self.folder / BEST_DIR).exists():
                shutil.rmtree(self.folder / BEST_DIR)
            snapshot.rename(self.folder / BEST_DIR)
            self.best = {"step": step, "metric": metric, "score": record[metric],
                         "weights": [w.relative_to(snapshot).as_posix() for w in weights]}
        else:
            shutil.rmtree(snapshot)
        self.records = [r for r in self.records if r["step"] != step] + [record]
        write_json_atomic(self.folder / RECORDS, {"steps": self.records, "best": self.best})
        scores = "".join(f", {k} {record[k]:.4f}" for k in ("clip_t", "clip_i") if k in record)
        chosen = f", best so far step {self.best['step']}" if self.best else ""
        self.progress(f"validated step {step}: {len(images)} images{scores}{chosen}")
        return record

    def _write_images(self, step: int, pairs, images) -> dict[str, Any]:
        from assets_pipeline.imaging import labeled_grid

        final = self.folder / step_name(step)
        tmp = self.folder / f".{step_name(step)}.tmp"
        for path in (tmp, final):
            if path.exists():
                shutil.rmtree(path)
        tmp.mkdir()
        rows = []
        for i, ((prompt, seed), img) in enumerate(zip(pairs, images)):
            img.save(tmp / f"{i}.png")
            rows.append({"prompt": prompt, "seed": seed, "file": f"{STEPS_DIR}/{step_name(step)}/{i}.png"})
        strip = labeled_grid([(f"step {step}", [(f"seed {s}: {p}", img) for (p, s), img in zip(pairs, images)])])
        strip.save(tmp / "strip.png")
        tmp.rename(final)
        return {"step": step, "strip": f"{STEPS_DIR}/{step_name(step)}/strip.png", "images": rows}

    def _score(self, record: dict, images: list, prompts: list[str]) -> None:
        """CLIP-T and CLIP-I of the step as the final validation computes them (output.validate), plus each
        image's own."""
        if self._scorer is None:
            self._scorer = job_scorer(self.job, str(self.device))
            self._train_embeds = self._scorer.embed_images(training_photos(self.job))
        clip_t = self._scorer.score(images, prompts)
        clip_i = self._scorer.embed_images(images) @ self._train_embeds.T
        record.update(clip_t=float(clip_t.mean()), clip_i=float(clip_i.mean()))
        for row, t, i in zip(record["images"], clip_t, clip_i.mean(axis=1)):
            row.update(clip_t=float(t), clip_i=float(i))

    def summary(self) -> dict[str, Any]:
        """What write_output needs: where the validations are, and the chosen step."""
        return {"folder": str(self.folder), "every": self.cfg.validation_steps, "select_best": self.cfg.select_best,
                "records": self.records, "best": self.best}


def write_step_validations(validation: dict[str, Any], out: Path) -> dict[str, Any]:
    """The validations during training into the output folder ``out``: each step's images and strip under
    ``validation_steps/``, ``validation_steps.json`` and ``validation_steps.csv``. Returns the metrics to add."""
    from assets_pipeline.store import write_json_atomic

    folder = Path(validation["folder"])
    records = sorted(validation["records"], key=lambda r: r["step"])
    for r in records:
        shutil.copytree(folder / step_name(r["step"]), out / STEPS_DIR / step_name(r["step"]))
    best = validation["best"]
    selected = {"selected_step": best["step"], "selected_metric": best["metric"], "selected_score": best["score"]} \
        if best else {}
    write_json_atomic(out / TABLE, {"every": validation["every"], "select_best": validation["select_best"],
                                    **selected, "steps": records})
    with open(out / TABLE_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "prompt", "seed", "file", "clip_t", "clip_i"])
        for r in records:
            for img in r["images"]:
                w.writerow([r["step"], img["prompt"], img["seed"], img["file"], img.get("clip_t", ""),
                            img.get("clip_i", "")])
    return {"validated_steps": [r["step"] for r in records], **selected}


def _sheet_rows(records: list[dict], selected: int | None) -> list[dict]:
    """At most MAX_SHEET_ROWS steps: the first, the last, the chosen one and evenly spaced ones between."""
    if len(records) <= MAX_SHEET_ROWS:
        return records
    n = len(records)
    keep = {round(i * (n - 1) / (MAX_SHEET_ROWS - 2)) for i in range(MAX_SHEET_ROWS - 1)}
    keep |= {i for i, r in enumerate(records) if r["step"] == selected}
    return [records[i] for i in sorted(keep)]


def step_views(out: Path) -> dict[str, tuple[str, Any]]:
    """How the validations during training show in the Dagster UI, as (kind, value) pairs like
    ``reuse.output_views``: one sheet of the steps' strips (a row per step, the chosen one marked), the
    folder, and the chosen step's numbers. Empty for an output trained without validation_steps."""
    from PIL import Image

    from assets_pipeline.imaging import image_markdown, labeled_grid

    if not (out / TABLE).is_file():
        return {}
    table = json.loads((out / TABLE).read_text())
    selected = table.get("selected_step")
    rows = []
    for r in _sheet_rows(table["steps"], selected):
        cells = []
        for img in r["images"]:
            with Image.open(out / img["file"]) as f:
                cells.append((f"seed {img['seed']}: {img['prompt']}", f.convert("RGB")))
        scores = "".join(f", {k} {r[k]:.3f}" for k in ("clip_t", "clip_i") if k in r)
        rows.append((f"step {r['step']}{scores}" + (" (chosen)" if r["step"] == selected else ""), cells))
    more = len(table["steps"]) - len(rows)
    alt = "validation during training, per step" + (f" ({more} more steps in the folder)" if more else "")
    views: dict[str, tuple[str, Any]] = {
        "validation_steps": ("md", image_markdown(labeled_grid(rows, tile=192), alt, max_side=1280, jpeg_quality=85)),
        "validation_steps_path": ("path", str(out / STEPS_DIR)),
    }
    if selected is not None:
        chosen = next(r for r in table["steps"] if r["step"] == selected)
        views["selected_step"] = ("int", selected)
        views.update({f"selected_{k}": ("float", shown(chosen[k])) for k in ("clip_t", "clip_i") if k in chosen})
    return views
