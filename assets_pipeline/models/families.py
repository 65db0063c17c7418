"""Base-model families: what a base model is (SD 1.x, SD 2.x, SDXL, SD 3.x, Flux.1) and every choice that follows
from it.

A family is a row of facts and the behaviour objects they name, not a code path: the pipeline and ControlNet
pipeline classes that load it, its denoiser (class, how it is called, how a ControlNet joins it), its text
encoders and how a prompt becomes conditioning, what the denoiser is trained to predict, its default training
resolution, and how its configs and checkpoints are recognised. Callers read these attributes instead of
comparing family names, so a new family is one more row here (and, for a new kind of network, a module like
``unet.py`` (the U-Net families) or ``mmdit.py`` (the flow-matching transformers) with its denoiser and
objective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from assets_pipeline.models.mmdit import FLOW, FlowMatchingObjective, FluxDenoiser, SD3Denoiser
from assets_pipeline.models.text import ClipPooledT5, LastHiddenState, PenultimateConcat, TwoClipsAndT5
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
    config_class: str = "CLIPTextConfig"  # the transformers config its weights are built from (embedded models)
    # Whether LoRA's train_text_encoder trains it: the CLIP encoders; not T5 (diffusers' SD3 and Flux LoRA scripts
    # train the CLIP encoders only, and their pipelines' save_lora_weights has no place for a T5 LoRA).
    trains_lora: bool = True
    # Tokens it reads: None = its tokenizer's model_max_length (CLIP: 77); a T5 encoder's is the family's
    # max_sequence_length, what its pipeline encodes with by default.
    max_length: int | None = None


CLIP_L = TextEncoder("text_encoder", "tokenizer", "CLIPTextModel", "clip_l")
# SD 3.x's CLIP encoders are both the projected ones: their pooled outputs side by side are its pooled embedding.
CLIP_L_PROJECTED = TextEncoder("text_encoder", "tokenizer", "CLIPTextModelWithProjection", "clip_l")
CLIP_G = TextEncoder("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "clip_g")


def t5(component: str, tokenizer: str, max_length: int) -> TextEncoder:
    """A T5 v1.1 XXL encoder (its self-attention's projections are q, k, v, o)."""
    return TextEncoder(component, tokenizer, "T5EncoderModel", "t5", tokenizer_class="T5TokenizerFast",
                       lora_targets=("q", "k", "v", "o"), config_class="T5Config", max_length=max_length,
                       trains_lora=False)


@dataclass(frozen=True)
class ModelFamily:
    """What a family of base models has in common. Every field is read by callers; none is decoration."""

    name: str
    # diffusers pipeline class for from_pretrained and from_single_file (both live on the same class), and the
    # ControlNet pipeline a trained ControlNet loads into.
    pipeline_class: str
    controlnet_pipeline_class: str
    denoiser: Any  # models/unet.py or models/mmdit.py: the network that denoises, how it is called
    # In the order their outputs are concatenated (the last one's pooled output is SDXL's pooled embedding).
    text_encoders: tuple[TextEncoder, ...]
    prompt_encoding: Any  # models/text.py: how token ids become (prompt_embeds, pooled_prompt_embeds)
    objective: Any  # what the denoiser is trained to predict (DDPM's noise or velocity; rectified flow)
    # The resolution the published models were trained at, and the one for v-prediction models where it
    # differs (SD 2.x: 512 px "base" models predict epsilon, the 768 px models v; stabilityai model cards).
    default_resolution: int
    v_prediction_resolution: int | None
    # Used only when no scheduler config says (a single file without a config folder): what diffusers' own
    # default config for the family has (SD 1.5 and SDXL base: epsilon; SD 2.1: v_prediction).
    default_prediction_type: str
    # U-Net cross_attention_dim of the published models (the text encoders' width), used to tell SD 2.x from
    # SD 1.x, whose folders differ in nothing else structural; None for a transformer family.
    cross_attention_dim: int | None
    # diffusers' single-file model types (`infer_diffusers_model_type`) of this family, and a key prefix only its
    # original-layout checkpoints have (how the layout itself names the family): the U-Net families' text encoder
    # prefix; SD 3.x's joint blocks; Flux's double blocks (Black Forest Labs' files hold the transformer alone).
    single_file_model_types: tuple[str, ...]
    single_file_prefix: str
    vae_class: str = "AutoencoderKL"
    # The scheduler validation renders with, built from the model's scheduler config: DPM-Solver++ for the DDPM
    # families (diffusers' training scripts' log_validation); None keeps the pipeline's own (flow matching's Euler).
    validation_scheduler: str | None = "DPMSolverMultistepScheduler"
    # The pipeline's own sampling defaults (its __call__'s num_inference_steps and guidance_scale), what class
    # images use with the model's own scheduler: SD 1.x/2.x/SDXL 50 and 7.5 (and train_dreambooth.py's), SD 3.x 28
    # and 7.0, Flux.1 28 and 3.5 (its guidance embedding's input; Flux.1 schnell ignores it and samples in 4 steps:
    # set [class_images] num_inference_steps = 4 for it).
    sampling_steps: int = 50
    guidance_scale: float = 7.5

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

    def text_max_lengths(self, max_sequence_length: int | None = None) -> tuple[int | None, ...]:
        """Tokens each encoder reads, in the family's order: None for a CLIP encoder (its tokenizer's 77), the T5
        encoder's ``max_sequence_length`` (None = the family's default, its pipeline's)."""
        return tuple(None if e.max_length is None else (max_sequence_length or e.max_length)
                     for e in self.text_encoders)

    @property
    def has_sequence_length(self) -> bool:
        """Whether a text encoder reads a configurable number of tokens (T5's max_sequence_length)."""
        return any(e.max_length is not None for e in self.text_encoders)

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
        # SD 3.x (medium and large): MMDiT with three text encoders, trained with rectified flow; its pipeline
        # encodes 256 T5 tokens by default (StableDiffusion3Pipeline.encode_prompt's max_sequence_length).
        ModelFamily("sd3", "StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline", SD3Denoiser(),
                    (CLIP_L_PROJECTED, CLIP_G, t5("text_encoder_3", "tokenizer_3", 256)), TwoClipsAndT5(),
                    FlowMatchingObjective("logit_normal", precondition_outputs=True), 1024, None, FLOW, None,
                    ("sd3", "sd35_medium", "sd35_large"), "model.diffusion_model.joint_blocks.",
                    validation_scheduler=None, sampling_steps=28, guidance_scale=7.0),
        # Flux.1 (dev, schnell): CLIP-L's pooled output and 512 T5 tokens (FluxPipeline's default), rectified flow
        # with uniform timesteps and no weighting (train_dreambooth_lora_flux.py's default weighting_scheme "none").
        ModelFamily("flux", "FluxPipeline", "FluxControlNetPipeline", FluxDenoiser(),
                    (CLIP_L, t5("text_encoder_2", "tokenizer_2", 512)), ClipPooledT5(),
                    FlowMatchingObjective("none", precondition_outputs=False), 1024, None, FLOW, None,
                    ("flux-dev", "flux-schnell"), "double_blocks.", validation_scheduler=None, sampling_steps=28,
                    guidance_scale=3.5),
    )
}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_pipeline(pipe) -> ModelFamily:
    """The family whose pipeline (or ControlNet pipeline) class ``pipe`` is an instance of."""
    for family in FAMILIES.values():
        if isinstance(pipe, (diffusers_class(family.pipeline_class), diffusers_class(family.controlnet_pipeline_class))):
            return family
    raise TypeError(f"{type(pipe).__name__} is not the pipeline of any family trained here "
                    f"({sorted(f.pipeline_class for f in FAMILIES.values())})")


def diffusers_class(name: str):
    """A diffusers class by the name a family row gives (``pipeline_class``, ``controlnet_pipeline_class``, ...)."""
    import diffusers

    return getattr(diffusers, name)
