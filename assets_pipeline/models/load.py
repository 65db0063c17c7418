"""Loading a resolved base model: the whole pipeline, or named components.

Every stage that needs the base model loads it here: latents (VAE, text encoders, tokenizers), class images
and renders (the pipeline), training (denoiser, scheduler config, tokenizers, and the text encoders when a method
runs them). A folder (embedded, local or from the hub cache) is read component by component with the classes its
family names, so only what is asked for is loaded; a single-file checkpoint is loaded whole by its family's
pipeline class and the parts taken from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from assets_pipeline.models.families import diffusers_class
from assets_pipeline.models.resolve import BaseModelRef

# What load_components can load, by name.
COMPONENTS = ("vae", "denoiser", "text_encoders", "tokenizers")


def quiet_progress_bars() -> None:
    """Loading bars from diffusers/transformers would flood run logs; progress is reported by our own logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; anything else as given. Imports torch only here,
    at the moment a model is actually loaded."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def render_dtype():
    """The one dtype renders (validation, the base model's reference images, the changes_base_output check) load
    pipelines in, whatever dtype the weights were saved in: fp32. The trained parts applied to the base are fp32,
    and a checkpoint saved in fp16 would otherwise give a pipeline of mixed dtypes ("mat1 and mat2 must have the
    same dtype": transformers loads the text encoders as saved, diffusers the rest in fp32)."""
    import torch

    return torch.float32


def load_pipeline(ref: BaseModelRef, torch_dtype: Any = None, **components):
    """The base model as its family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, ...).
    ``torch_dtype`` None keeps each component's saved dtype (what an output folder built on the base keeps);
    ``components``: parts already loaded, used in place of the model's (diffusers' component overrides)."""
    cls = diffusers_class(ref.model_family.pipeline_class)
    quiet_progress_bars()
    # diffusers 0.42 names it dtype (torch_dtype is deprecated there, to be removed in 1.0)
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}
    kwargs.update(components)
    if ref.kind == "single_file":
        if ref.single_file_config:
            kwargs["config"] = ref.single_file_config
        return cls.from_single_file(ref.location, local_files_only=True, **kwargs)
    return cls.from_pretrained(ref.location, local_files_only=True, **kwargs)


def base_pipeline_loader(ref: BaseModelRef, torch_dtype=None):
    """A zero-argument function that loads the base pipeline (what methods apply their outputs to); renders pass
    :func:`render_dtype`."""
    def load():
        return load_pipeline(ref, torch_dtype=torch_dtype)

    return load


def load_tokenizers(ref: BaseModelRef) -> tuple[Any, ...]:
    """The base model's own tokenizers, one per text encoder in its family's order (``model_max_length`` is how
    many tokens each encoder reads), from their folders without loading any weights. A single-file checkpoint
    has none: its config folder's when one is set, else its whole pipeline is loaded for them (as diffusers
    infers tokenizers)."""
    import transformers

    encoders = ref.model_family.text_encoders
    folder = ref.location if ref.kind != "single_file" else ref.single_file_config
    if folder and all((Path(folder) / e.tokenizer).is_dir() for e in encoders):
        return tuple(getattr(transformers, e.tokenizer_class).from_pretrained(folder, subfolder=e.tokenizer,
                                                                              local_files_only=True)
                     for e in encoders)
    if ref.kind != "single_file":
        missing = [e.tokenizer for e in encoders if not (Path(folder) / e.tokenizer).is_dir()]
        raise FileNotFoundError(f"{folder}: no {missing} folder; a {ref.family} model has tokenizers "
                                f"{list(ref.model_family.tokenizer_names)}")
    pipe = load_pipeline(ref)
    return tuple(getattr(pipe, e.tokenizer) for e in encoders)


@dataclass
class Components:
    """Some of a base model's parts, by name; what was not asked for is None. ``vae_config`` and
    ``scheduler_config`` are always there (read from JSON, no weights)."""

    vae_config: Any
    scheduler_config: Any
    vae: Any = None
    denoiser: Any = None
    text_encoders: tuple | None = None  # in the family's order
    tokenizers: tuple | None = None


def load_components(ref: BaseModelRef, which: Iterable[str], denoiser_kwargs: dict | None = None) -> Components:
    """The parts of ``ref`` named in ``which`` (see :data:`COMPONENTS`), in the dtype they were saved in;
    ``denoiser_kwargs``: more arguments for the denoiser's ``from_pretrained`` / ``from_single_file`` (a
    quantization config and the dtype it loads in: training/quantization.py)."""
    which = set(which)
    if unknown := which - set(COMPONENTS):
        raise ValueError(f"unknown components {sorted(unknown)}; known: {list(COMPONENTS)}")
    quiet_progress_bars()
    family = ref.model_family
    denoiser_cls = diffusers_class(family.denoiser.model_class)
    if ref.kind == "single_file":
        overrides = {}
        if denoiser_kwargs and "denoiser" in which:  # the denoiser from the same file, loaded as asked
            config = {"config": ref.single_file_config, "subfolder": family.denoiser.component} \
                if ref.single_file_config else {}
            overrides[family.denoiser.component] = denoiser_cls.from_single_file(
                ref.location, local_files_only=True, **config, **denoiser_kwargs)
        pipe = load_pipeline(ref, **overrides)
        return Components(
            vae_config=pipe.vae.config, scheduler_config=pipe.scheduler.config,
            vae=pipe.vae if "vae" in which else None,
            denoiser=getattr(pipe, family.denoiser.component) if "denoiser" in which else None,
            text_encoders=tuple(getattr(pipe, e.component) for e in family.text_encoders)
            if "text_encoders" in which else None,
            tokenizers=tuple(getattr(pipe, e.tokenizer) for e in family.text_encoders)
            if "tokenizers" in which else None)
    import transformers

    location = ref.location
    vae_cls = diffusers_class(family.vae_class)
    scheduler_config = diffusers_class(family.objective.scheduler_class).load_config(
        location, subfolder="scheduler", local_files_only=True)
    return Components(
        vae_config=SimpleNamespace(**vae_cls.load_config(location, subfolder="vae", local_files_only=True)),
        scheduler_config=scheduler_config,
        vae=vae_cls.from_pretrained(location, subfolder="vae", local_files_only=True) if "vae" in which else None,
        denoiser=denoiser_cls.from_pretrained(location, subfolder=family.denoiser.component, local_files_only=True,
                                              **(denoiser_kwargs or {})) if "denoiser" in which else None,
        text_encoders=tuple(getattr(transformers, e.model_class).from_pretrained(
            location, subfolder=e.component, local_files_only=True) for e in family.text_encoders)
        if "text_encoders" in which else None,
        tokenizers=load_tokenizers(ref) if "tokenizers" in which else None)
