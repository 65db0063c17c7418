"""Checks of a trained output folder (pure; the Dagster asset checks call these)."""

from __future__ import annotations

import json
from pathlib import Path

from assets_pipeline.lineage import LINEAGE_FILE, row_concept


def nonfinite_tensors(out_dir: Path) -> dict[str, int]:
    """Weight file -> number of non-finite values, for every weights file the lineage manifest lists."""
    import torch
    from safetensors.torch import load_file

    manifest = json.loads((out_dir / LINEAGE_FILE).read_text())
    bad = {}
    for rel in manifest["weights"]:
        tensors = load_file(str(out_dir / rel))
        bad[rel] = int(sum((~torch.isfinite(t.float())).sum().item() for t in tensors.values()))
    return bad


def manifest_difference(out_dir: Path, expected_rows: list[dict]) -> tuple[set, set]:
    """(trained on but not expected, expected but missing) as (concept, image_sha256, role, caption); a row
    without a concept is the output's concept's."""
    manifest = json.loads((out_dir / LINEAGE_FILE).read_text())

    def key(r: dict) -> tuple:
        return row_concept(r, manifest), r["image_sha256"], r["role"], r["caption"]

    listed = {key(r) for r in manifest["training_images"]}
    expected = {key(r) for r in expected_rows}
    return listed - expected, expected - listed


def change_versus_base(method, base_model, out_dir: Path, ctx, seed: int = 0, steps: int = 5,
                       device: str = "cpu", base_renders=None) -> float:
    """Mean absolute pixel difference (0..1) between the base model's image and the output's, loaded through
    stock diffusers, for the same prompt and seed (CPU-seeded noise, so any device renders the same start).
    0 means the output changes nothing. ``base_renders``: a :class:`~assets_pipeline.training.render.BaseRenders`
    (the base image from its cache); None renders it."""

    from assets_pipeline.training.render import BaseRenders, pixel_change, render

    prompt = method.validation_prompt(ctx)
    renders = base_renders or BaseRenders(base_model, device, None)
    base = renders([(prompt, seed)], ctx.resolution, steps)[0]  # first: on a cache miss its pipeline is reused
    load_base = renders.take_pipe()
    tuned = render(method.load_pipeline(load_base, out_dir, ctx).to(device), prompt, seed, ctx.resolution, steps,
                   **method.validation_kwargs(out_dir, ctx, 0))
    return pixel_change(tuned, base)
