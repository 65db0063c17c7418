"""Base-model families: what a base model is (SD 1.x, SD 2.x, SDXL) and every choice that follows from it.

A family is a row of facts and the behaviour objects they name, not a code path: the pipeline and ControlNet
pipeline classes that load it, its denoiser (class, how it is called, how a ControlNet joins it), its text
encoders and how a prompt becomes conditioning, what the denoiser is trained to predict, its default training
resolution, and how its configs and checkpoints are recognised. Callers read these attributes instead of
comparing family names, so a new family is one more row here (and, for a new kind of network, a module beside
``unet.py`` with its denoiser and objective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from assets_pipeline.models.text import LastHiddenState, PenultimateConcat
from assets_pipeline.models.unet import EPSILON, V_PREDICTION, DenoisingObjective, UNetDenoiser


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder as a pipeline names its parts."""

    component: str  # the pipeline's attribute and folder, e.g. "text_encoder_2"
    tokenizer: str  # its tokenizer's, e.g. "tokenizer_2"
    model_class: str  # the transformers class that loads it
    # The key of its row in a textual-inversion file that holds one row per encoder (A1111's and ComfyUI's SDXL
    # embeddings: clip_l, clip_g).
    embedding_key: str
    tokenizer_class: str = "CLIPTokenizer"
    # LoRA's targets in it with train_text_encoder: CLIP's attention projections (diffusers' LoRA scripts).
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")


CLIP_L = TextEncoder("text_encoder", "tokenizer", "CLIPTextModel", "clip_l")


@dataclass(frozen=True)
class ModelFamily:
    """What a family of base models has in common. Every field is read by callers; none is decoration."""

    name: str
    # diffusers pipeline class for from_pretrained and from_single_file (both live on the same class), and the
    # ControlNet pipeline a trained ControlNet loads into.
    pipeline_class: str
    controlnet_pipeline_class: str
    denoiser: UNetDenoiser
    # In the order their outputs are concatenated (the last one's pooled output is SDXL's pooled embedding).
    text_encoders: tuple[TextEncoder, ...]
    prompt_encoding: Any  # models/text.py: how token ids become (prompt_embeds, pooled_prompt_embeds)
    objective: DenoisingObjective
    # The resolution the published models were trained at, and the one for v-prediction models where it
    # differs (SD 2.x: 512 px "base" models predict epsilon, the 768 px models v; stabilityai model cards).
    default_resolution: int
    v_prediction_resolution: int | None
    # Used only when no scheduler config says (a single file without a config folder): what diffusers' own
    # default config for the family has (SD 1.5 and SDXL base: epsilon; SD 2.1: v_prediction).
    default_prediction_type: str
    # U-Net cross_attention_dim of the published models (the text encoders' width), used to tell SD 2.x from
    # SD 1.x, whose folders differ in nothing else structural.
    cross_attention_dim: int
    # diffusers' single-file model types (`infer_diffusers_model_type`) of this family, and the key prefix of
    # its text encoder in an original-layout checkpoint (how the layout itself names the family).
    single_file_model_types: tuple[str, ...]
    single_file_text_prefix: str
    vae_class: str = "AutoencoderKL"

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(t.component for t in self.text_encoders)

    @property
    def tokenizer_names(self) -> tuple[str, ...]:
        return tuple(t.tokenizer for t in self.text_encoders)

    @property
    def num_text_encoders(self) -> int:
        return len(self.text_encoders)

    @property
    def pooled_text(self) -> bool:
        """Whether its prompt encoding gives a pooled embedding (cached beside the token embeddings)."""
        return self.prompt_encoding.pooled

    @property
    def micro_conditioning(self) -> bool:
        """Whether its denoiser takes SDXL's size conditioning (add_time_ids, cached per latent)."""
        return self.denoiser.micro_conditioning

    def resolution_for(self, prediction_type: str) -> int:
        if prediction_type == V_PREDICTION and self.v_prediction_resolution:
            return self.v_prediction_resolution
        return self.default_resolution

    def encode_prompt(self, text_encoders, token_ids):
        """(prompt_embeds, pooled_prompt_embeds or None) from each encoder's token ids."""
        return self.prompt_encoding.encode(text_encoders, token_ids)


_UNET = UNetDenoiser(micro_conditioning=False)
_DDPM = DenoisingObjective()

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("sd1", "StableDiffusionPipeline", "StableDiffusionControlNetPipeline", _UNET, (CLIP_L,),
                    LastHiddenState(), _DDPM, 512, None, EPSILON, 768, ("v1",), "cond_stage_model.transformer."),
        ModelFamily("sd2", "StableDiffusionPipeline", "StableDiffusionControlNetPipeline", _UNET, (CLIP_L,),
                    LastHiddenState(), _DDPM, 512, 768, V_PREDICTION, 1024, ("v2",), "cond_stage_model.model."),
        # SDXL's second encoder is OpenCLIP ViT-bigG's text tower with its projection: its pooled output
        # conditions the U-Net.
        ModelFamily("sdxl", "StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline",
                    UNetDenoiser(micro_conditioning=True),
                    (CLIP_L, TextEncoder("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "clip_g")),
                    PenultimateConcat(), _DDPM, 1024, None, EPSILON, 2048, ("xl_base",), "conditioner.embedders."),
    )
}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def diffusers_class(name: str):
    """A diffusers class by the name a family row gives (``pipeline_class``, ``controlnet_pipeline_class``, ...)."""
    import diffusers

    return getattr(diffusers, name)
