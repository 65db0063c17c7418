"""Plain helpers for the tests: real photos that ship inside installed wheels, encoders to bytes, concept folders.

Nothing here downloads: skimage.data's images used here ship in the scikit-image wheel.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

SPEC = 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora"]\n'


def photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB photo from ``skimage.data`` (e.g. 'astronaut', 'coffee', 'chelsea'), optionally resized (w, h)."""
    from skimage import data

    img = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
    return img.resize(size, Image.Resampling.LANCZOS) if size else img


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_concept(data_root: Path, name: str, files: dict[str, bytes], spec: str | None = SPEC) -> Path:
    """A concept folder with ``files`` (relative name -> bytes) and, unless None, a concept.toml."""
    folder = data_root / name
    folder.mkdir(parents=True, exist_ok=True)
    if spec is not None:
        (folder / "concept.toml").write_text(spec)
    for rel, content in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    return folder


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size, (a.size, b.size)
    return float(np.abs(np.asarray(a.convert("RGB"), np.float64) - np.asarray(b.convert("RGB"), np.float64)).mean())


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: relative path -> (bytes, mtime_ns)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_synthetic_bundle(root: Path, seed: int = 0) -> Path:
    """A latents bundle of three 64 px instance rows ("a", "b", "c") with random latents and text embeddings
    for the embedded model (text width 32), in ``root/latents.safetensors`` with its digest recorded: enough for
    the training loop without a dataset build."""
    import torch
    from safetensors.torch import save_file

    from assets_pipeline.store import record_digest

    g = torch.Generator().manual_seed(seed)
    save_file({"prompt_embeds": torch.randn(3, 77, 32, generator=g),
               "latent_mean@64x64": torch.randn(3, 4, 32, 32, generator=g),
               "latent_std@64x64": torch.full((3, 4, 32, 32), 0.1)}, str(root / "latents.safetensors"),
              metadata={"image_sha256": '["a", "b", "c"]', "role": '["instance", "instance", "instance"]',
                        "bucket": '["64x64", "64x64", "64x64"]'})
    record_digest(root / "latents.safetensors")
    return root / "latents.safetensors"
