"""LoRA (Hu et al. 2021) on the U-Net attention projections through PEFT; optional text-encoder LoRA.

Defaults from diffusers' examples/dreambooth/train_dreambooth_lora.py: lr 1e-4, rank 4. Saved with diffusers'
LoRA saver (``pytorch_lora_weights.safetensors``, loads with ``pipe.load_lora_weights(dir)``) and in kohya
format (``kohya_lora.safetensors``: A1111, ComfyUI, and ``load_lora_weights`` too). On an SDXL base model the
same U-Net LoRA is saved with ``StableDiffusionXLPipeline.save_lora_weights`` (train_dreambooth_lora_sdxl.py);
text-encoder LoRA is SD 1.x/2.x only for now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from assets_pipeline.training.config import TrainConfig
from assets_pipeline.training.methods import register
from assets_pipeline.training.methods.base import Method, Models, TrainContext, TrainingInputError, encode_text

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "kohya_lora.safetensors"


@dataclass(frozen=True)
class LoraConfig(TrainConfig):
    learning_rate: float = field(default=1e-4, metadata={"help": "diffusers' LoRA example default."})
    rank: int = field(default=4, metadata={"help": "LoRA rank r (diffusers' default 4)."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None = rank (scale 1)."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    train_text_encoder: bool = field(default=False, metadata={"help": "Also train LoRA on the text encoder."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


class LoraMethod(Method):
    name = "lora"
    asset_name = "lora_adapter"
    config_cls = LoraConfig

    def needs_text_encoder(self, cfg: LoraConfig) -> bool:
        return cfg.train_text_encoder

    def check_inputs(self, ctx: TrainContext, cfg: LoraConfig) -> None:
        from assets_pipeline.families import get_family

        # SDXL's text-encoder LoRA trains both encoders and re-encodes pooled embeddings each step: not ported.
        if cfg.train_text_encoder and get_family(ctx.family).num_text_encoders > 1:
            raise TrainingInputError(
                f"lora for concept {ctx.concept!r}: train_text_encoder = true is not yet supported for SDXL base "
                f"models (family {ctx.family}); set train_text_encoder = false under [lora] (the U-Net LoRA trains)")
        super().check_inputs(ctx, cfg)

    def _peft_config(self, cfg: LoraConfig, targets):
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                              init_lora_weights="gaussian", target_modules=list(targets))

    def prepare(self, models: Models, cfg: LoraConfig, ctx: TrainContext) -> list[str]:
        models.unet.requires_grad_(False)
        models.unet.add_adapter(self._peft_config(cfg, UNET_TARGETS))
        trainable = ["unet"]
        if cfg.train_text_encoder:
            models.text_encoder.requires_grad_(False)
            models.text_encoder.add_adapter(self._peft_config(cfg, TEXT_TARGETS))
            trainable.append("text_encoder")
        return trainable

    def encode(self, models: Models, batch):
        # The loop tokenizes captions only when the text encoder trains (needs_text_encoder).
        return encode_text(models, batch) if batch.input_ids is not None else batch.prompt_embeds

    def save(self, models: Models, load_base, out_dir: Path, cfg: LoraConfig, ctx: TrainContext):
        from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        from assets_pipeline.families import get_family, pipeline_class

        unet_sd = get_peft_model_state_dict(models.unet)
        te_sd = get_peft_model_state_dict(models.text_encoder) if cfg.train_text_encoder else None
        # The family's pipeline class saves the file its own load_lora_weights reads (SDXL's has text_encoder_2).
        pipeline_class(models.family or get_family(ctx.family)).save_lora_weights(
            out_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(te_sd) if te_sd else None,
            unet_lora_adapter_metadata=models.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=(
                models.text_encoder.peft_config["default"].to_dict() if te_sd else None),
            safe_serialization=True,
        )
        peft_sd = {f"unet.{k}": v for k, v in unet_sd.items()}
        if te_sd:
            peft_sd.update({f"text_encoder.{k}": v for k, v in te_sd.items()})
        kohya = convert_state_dict_to_kohya(peft_sd)
        alpha = float(cfg.alpha or cfg.rank)
        for k in kohya:
            if k.endswith(".alpha"):  # the converter writes alpha = rank; ours may differ
                kohya[k] = kohya[k].new_tensor(alpha, dtype=kohya[k].dtype if kohya[k].is_floating_point() else None)
        save_file({k: v.contiguous() for k, v in kohya.items()}, str(out_dir / KOHYA_FILE))
        return [out_dir / DIFFUSERS_FILE, out_dir / KOHYA_FILE]

    def load_pipeline(self, load_base, out_dir: Path, ctx: TrainContext):
        pipe = load_base()
        pipe.load_lora_weights(str(out_dir), weight_name=DIFFUSERS_FILE)
        return pipe


register(LoraMethod())
