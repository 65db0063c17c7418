"""Plain helpers for the tests: real photos that ship inside installed wheels, encoders to bytes, concept folders,
typed training jobs and rows without a dataset build, and the contract table of the four methods.

Nothing here downloads: skimage.data's images used here ship in the scikit-image wheel.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
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


def photos(names, size: tuple[int, int] = (96, 80)) -> dict[str, bytes]:
    """PNG files of :func:`photo` ``names`` at ``size``, by file name, for :func:`write_concept`."""
    return {f"{n}.png": encode(photo(n, size), "PNG") for n in names}


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


def write_synthetic_bundle(root: Path, seed: int = 0, n: int = 3, bucket: tuple[int, int] = (64, 64)) -> Path:
    """A latents bundle of ``n`` (default three) instance rows ("a", "b", "c", ...) in one ``bucket`` (width, height;
    default 64 px square) with random latents and text embeddings for the embedded model (text width 32, VAE factor
    2), in ``root/latents.safetensors`` with its digest recorded: enough for the training loop without a dataset
    build."""
    import torch
    from safetensors.torch import save_file

    from assets_pipeline.store import record_digest

    names, label = "abcdefghijklmnopqrstuvwxyz"[:n], f"{bucket[0]}x{bucket[1]}"
    shape = (n, 4, bucket[1] // 2, bucket[0] // 2)
    g = torch.Generator().manual_seed(seed)
    save_file({"prompt_embeds": torch.randn(n, 77, 32, generator=g),
               f"latent_mean@{label}": torch.randn(*shape, generator=g),
               f"latent_std@{label}": torch.full(shape, 0.1)}, str(root / "latents.safetensors"),
              metadata={"image_sha256": json.dumps(list(names)), "role": json.dumps(["instance"] * n),
                        "bucket": json.dumps([label] * n)})
    record_digest(root / "latents.safetensors")
    return root / "latents.safetensors"


def training_row(**fields):
    """A TrainingRow with the paths and keys a test leaves out empty."""
    from assets_pipeline.training.job import TrainingRow

    return TrainingRow(**{"latent_key": None, "text_key": None, "source_path": "", "decoded_path": "", **fields})


def make_job(method: str = "lora", config: dict | None = None, rows: tuple = (), base_model=None, **fields):
    """A typed TrainJob for tests that need one without a built concept: ``config`` overrides the method's
    defaults, ``rows`` are TrainingRow fields (the paths and keys they leave out are empty), ``fields`` any other
    TrainJob field (concept, checkpoint_dir, latents_dir, ...)."""
    from assets_pipeline.models.resolve import BaseModelRef
    from assets_pipeline.training.job import TrainJob
    from assets_pipeline.training.methods import get_method

    ref = base_model or BaseModelRef(source="embedded", kind="embedded", location="", fingerprint="f" * 64,
                                     resolution=64, family="sd1", prediction_type="epsilon")
    from assets_pipeline.training.runtime.settings import Performance

    rows = tuple(training_row(**r) for r in rows)
    if isinstance(fields.get("performance"), dict):
        fields["performance"] = Performance.from_dict(fields["performance"])
    defaults = {"concept": "c", "latents_dir": "", "output_dir": "", "checkpoint_dir": "", "token": "sks",
                "class_noun": "dog", "lineage": {}}
    return TrainJob(method=method, config=get_method(method).config_cls(**(config or {})), base_model=ref,
                    training_images=rows, **{**defaults, **fields})


def plan_for(storage, ref, spec, method: str, run_id: str = "test", input_versions: dict | None = None,
             trainer=None, clip_scorer=None, overrides: dict | None = None):
    """The job a model asset would plan for ``spec``'s concept with these resources (training/plan.py)."""
    from assets_pipeline.resources import ClipScorerResource, TrainerLauncher
    from assets_pipeline.training.plan import plan_job

    trainer, clip_scorer = trainer or TrainerLauncher(), clip_scorer or ClipScorerResource()
    return plan_job(storage.layout(), ref, spec, method, run_id=run_id, data_root=storage.data_path(),
                    launch=trainer.launch_settings(), scorer=clip_scorer.settings(), input_versions=input_versions,
                    overrides=overrides)


def same_weights(a, b) -> bool:
    """Two modules hold the same tensors under the same names."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def edited_copy(src: Path, dst: Path, edits: dict[str, dict]) -> Path:
    """A copy of a pipeline folder with some config keys changed (detection reads configs only)."""
    import shutil

    shutil.copytree(src, dst)
    for rel, changes in edits.items():
        path = dst / rel
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return dst


@dataclass(frozen=True)
class Contract:
    """What a fine-tuning method promises, whatever it trains (tests/test_methods.py holds each to it)."""

    asset: str  # the model asset's key
    learning_rate: float  # the default, from diffusers' example script of the method
    trains: tuple[str, ...]  # the networks prepare() marks trainable (SD 1.x)
    roles: tuple[str, ...]  # the rows a batch draws from
    weights: frozenset[str]  # the weights files the output holds (lineage.json "weights"), concept "c"
    runs_text_encoder: bool  # whether the loop loads and runs the text encoder by default


METHODS = {
    "lora": Contract("lora_adapter", 1e-4, ("unet",), ("instance",),
                     frozenset({"pytorch_lora_weights.safetensors", "kohya_lora.safetensors"}), False),
    "dreambooth": Contract("dreambooth_model", 5e-6, ("unet",), ("instance", "class"),
                           frozenset({"unet/diffusion_pytorch_model.safetensors",
                                      "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}),
                           False),
    "textual_inversion": Contract("textual_inversion_embedding", 5e-4, ("text_encoder",), ("instance",),
                                  frozenset({"learned_embeds.safetensors", "c.safetensors"}), True),
    "controlnet": Contract("controlnet_model", 1e-5, ("controlnet",), ("instance",),
                           frozenset({"diffusion_pytorch_model.safetensors"}), False),
}


def tiny_depth_model(folder: Path) -> Path:
    """A tiny random-weight DPT depth-estimation model and its image processor, saved in ``folder`` as a real one is
    (no download exists here: the architecture is transformers' own, the weights random)."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    DPTForDepthEstimation(DPTConfig(
        image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=37, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], is_hybrid=False, head_in_index=-1,
    )).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_hed_model(folder: Path) -> Path:
    """controlnet_aux's HED network (its real architecture, 15 M parameters) with random weights, saved as
    ``ControlNetHED.pth`` where ``HEDdetector.from_pretrained(folder)`` reads it."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    return folder


def tiny_pose_model(folder: Path) -> Path:
    """controlnet_aux's OpenPose body network (its real architecture, 52 M parameters) with random weights, saved
    as ``body_pose_model.pth`` with the key names the original file has (its loader strips each key's first part)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux.open_pose.model import bodypose_model

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    state = bodypose_model().state_dict()
    torch.save({k.split(".", 1)[1]: v for k, v in state.items()}, folder / "body_pose_model.pth")
    return folder
