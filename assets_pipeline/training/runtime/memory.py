"""The largest micro-batch that fits the card (``performance.micro_batch = 'auto'``): probed once with eager
forward and backward passes of the most memory-hungry batch, and cached per card, model and method."""

from __future__ import annotations

import json
from pathlib import Path

from assets_pipeline.hashing import digest


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def probe_micro_batch(try_batch, candidates: list[int], extra_bytes: int, fraction: float) -> tuple[int, dict]:
    """The largest candidate micro-batch whose forward+backward peak, plus ``extra_bytes`` (optimizer states not
    yet allocated), stays under ``fraction`` of the card's memory. ``try_batch(b)`` runs one eager step."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    tried = {}
    for b in candidates:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            try_batch(b)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        except torch.OutOfMemoryError:
            tried[b] = "out of memory"
            continue
        finally:
            torch.cuda.empty_cache()
        tried[b] = round((peak + extra_bytes) / 2**30, 2)
        if peak + extra_bytes <= fraction * total:
            return b, {"tried_gib": tried, "card_gib": round(total / 2**30, 2)}
    return candidates[-1], {"tried_gib": tried, "card_gib": round(total / 2**30, 2)}




def choose_micro_batch(job, method, models, data, cfg, effective: int, roles, params, weight_dtype, model_key: str,
                       fraction: float, channels_last: bool, progress) -> tuple[int, dict]:
    """The largest micro-batch dividing ``effective`` (the configured effective batch, train_batch_size x
    accumulation, or one process's share of it) that fits the card, probed once with eager forward+backward
    steps and cached per card, model and method. Returns (micro-batch, what the probe found)."""
    import torch

    from assets_pipeline.store import write_json_atomic
    from assets_pipeline.training.data import seeded_generator
    from assets_pipeline.training.optimizers import state_bytes
    from assets_pipeline.training.step import compute_loss

    key = digest("micro-batch", model_key, job.method, str(weight_dtype), cfg.gradient_checkpointing, len(roles),
                 data.shapes, effective, fraction, channels_last, cfg.optimizer, cfg.use_ema)
    path = Path(job.cache_dir) / "micro_batch" / f"{key}.json" if job.cache_dir else None
    if path is not None and path.is_file():
        answer = json.loads(path.read_text())
        progress(f"micro-batch {answer['micro_batch']} of effective batch {effective} (cached probe, {path})")
        return answer["micro_batch"], answer

    def try_batch(b: int) -> None:
        g = seeded_generator("micro-batch-probe", device=data.device)
        # The largest bucket of each role: every other bucket's micro-batch needs less memory.
        parts = data.draw(data.largest_indices(roles, b), g, models.scaling_factor, cfg.random_flip,
                           shift_factor=models.shift_factor)
        try:
            with torch.autocast(data.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
                loss = compute_loss(method, models, parts, cfg, g, weight_dtype, channels_last)
            loss.backward()
        finally:
            for p in params:
                p.grad = None

    # The optimizer's states are allocated at its first step, after the probe (and EMA's copy of the trained
    # weights after it too, when enabled).
    optimizer_bytes = state_bytes(cfg, params) + (sum(4 * p.numel() for p in params) if cfg.use_ema else 0)
    micro, info = probe_micro_batch(try_batch, divisors_descending(effective), optimizer_bytes, fraction)
    answer = {"micro_batch": micro, "effective_batch": effective, **info}
    if path is not None:
        write_json_atomic(path, answer)
    progress(f"micro-batch {micro} of effective batch {effective} fits (probe: {info})")
    return micro, answer
