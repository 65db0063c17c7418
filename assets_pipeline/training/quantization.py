"""The frozen base quantized while an adapter trains over it (QLoRA: Dettmers et al. 2023), LoRA's
``base_quantization``: the denoiser's linear weights stored in 8 or 4 bits and dequantized in each matmul, PEFT's
LoRA layers on top in full precision.

- ``float8``: torchao's float8 (e4m3) weight-only quantization, one scale per output channel
  (``quantize_`` with ``Float8WeightOnlyConfig``) of the loaded model, from a folder or a single file alike
  (diffusers' ``TorchAoConfig`` leaves a single file's weights unquantized). Half of bf16's bytes.
- ``int8``: torchao's int8 weight-only quantization (``Int8WeightOnlyConfig``), likewise.
- ``nf4``: bitsandbytes' 4-bit NormalFloat with bf16 compute (``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4")``), loaded and prepared as diffusers' Flux QLoRA example
  (examples/research_projects/flux_lora_quantization/train_dreambooth_lora_flux_miniature.py:
  ``from_pretrained(..., quantization_config=nf4_config, torch_dtype=...)`` then
  ``prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)``). A quarter of bf16's bytes;
  bitsandbytes' 4-bit loading needs a CUDA GPU (diffusers refuses it without one).

PEFT wraps both kinds' linears (``TorchaoLoraLinear``, ``Linear4bit``). Each is checked before any model loads,
with the setting, what it needs and what to do instead.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from assets_pipeline.training.methods.base import TrainingInputError

BASE_QUANTIZATIONS = ("float8", "int8", "nf4")
_PACKAGE = {"float8": "torchao", "int8": "torchao", "nf4": "bitsandbytes"}


def check_quantization(kind: str | None, cuda: bool, section: str) -> None:
    """Refuse, before any model is loaded, a ``base_quantization`` this trainer cannot run; ``section``: the
    concept.toml section it came from."""
    if kind is None:
        return
    where = f'[{section}] base_quantization = "{kind}"'
    package = _PACKAGE[kind]
    if kind == "nf4" and not cuda:
        raise TrainingInputError(
            f"{where} needs a CUDA GPU: bitsandbytes loads and runs 4-bit weights with CUDA kernels (diffusers "
            'refuses 4-bit loading without a GPU), and this trainer runs on the CPU. Use base_quantization = "int8" '
            'or "float8" (torchao, which runs on the CPU too), or remove the setting')
    if importlib.util.find_spec(package) is None:
        extra = "pip install 'assets-pipeline[quantization]'"
        raise TrainingInputError(
            f"{where} needs the {package} package, which is not installed in this environment: pip install "
            f"{package} (or {extra}), or remove the setting")


def loading_kwargs(kind: str | None, compute_dtype) -> dict[str, Any] | None:
    """What the denoiser's ``from_pretrained`` / ``from_single_file`` takes to load it quantized, or None: ``nf4``
    is bitsandbytes' ``Linear4bit``, made while loading (diffusers' ``BitsAndBytesConfig``, with the dtype of the
    weights left unquantized, which cannot be cast afterwards); torchao's kinds quantize the loaded model
    (:func:`quantize_loaded`), the same for a folder and a single file."""
    if kind != "nf4":
        return None
    import diffusers

    return {"quantization_config": diffusers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype),
        "torch_dtype": compute_dtype}


def quantize_loaded(module, kind: str, dtype, device):
    """The loaded denoiser quantized and made ready for adapter training, on ``device``: torchao's
    ``quantize_`` with ``Float8WeightOnlyConfig`` / ``Int8WeightOnlyConfig`` (every ``nn.Linear``, scales in
    ``dtype``); for ``nf4`` (quantized while loading) PEFT's ``prepare_model_for_kbit_training`` (frozen, the
    unquantized weights in fp32, as the QLoRA example)."""
    if kind == "nf4":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(module, use_gradient_checkpointing=False)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    module.requires_grad_(False).to(device, dtype)
    quantize_(module, Float8WeightOnlyConfig() if kind == "float8" else Int8WeightOnlyConfig())
    return module


def is_quantized(module) -> bool:
    """Whether ``module`` (or the module a DDP wrapper holds) holds quantized weights (torchao's tensor subclasses,
    or loaded with a diffusers quantization config): its dtype cannot be changed, only its device."""
    module = getattr(module, "module", module)
    if getattr(module, "hf_quantizer", None) is not None:
        return True
    if importlib.util.find_spec("torchao") is None:
        return False
    from torchao.utils import TorchAOBaseTensor

    return any(isinstance(p, TorchAOBaseTensor) for p in module.parameters())


def quantized_bytes(module) -> int:
    """The bytes ``module``'s parameters and buffers take as stored (a quantized weight: its packed data and
    scales)."""
    import torch

    def size(t) -> int:
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None:  # a torchao tensor subclass: the plain tensors it holds
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    with torch.no_grad():
        return sum(size(t) for t in [*module.parameters(), *module.buffers()])
