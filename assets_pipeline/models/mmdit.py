"""The flow-matching transformer families (SD 3.x's MMDiT, Flux.1): how their denoiser is called, how a ControlNet
joins it, and what it is trained to predict (rectified flow, Esser et al. 2024, as diffusers' training scripts
train it).

Sources, diffusers' examples: ``dreambooth/train_dreambooth_lora_sd3.py`` and ``train_dreambooth_lora_flux.py``
(the training step: timesteps from ``compute_density_for_timestep_sampling``, ``noisy = (1 - sigma) * latents +
sigma * noise``, the target ``noise - latents``, ``compute_loss_weighting_for_sd3``; SD3's
``--precondition_outputs``, on by default; Flux's packed latents, position ids and guidance), and
``controlnet/train_controlnet_sd3.py`` / ``train_controlnet_flux.py``.
"""

from __future__ import annotations

from typing import Any

from assets_pipeline.models.unet import Noised

FLOW = "flow"  # what these families' base models are recorded to predict (BaseModelRef.prediction_type)
# SD 3.x's LoRA targets (train_dreambooth_lora_sd3.py: the joint attention's image and text projections); Flux adds
# the feed-forward layers of both streams (train_dreambooth_lora_flux.py).
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")
FLUX_LORA_TARGETS = SD3_LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def _config(module):
    """A module's diffusers config, through a DDP wrapper if there is one."""
    return getattr(module, "module", module).config


class SD3Denoiser:
    """``SD3Transformer2DModel``: the latents as patches and the prompt tokens in one joint attention, conditioned on
    the pooled text embedding and the timestep (0..1000, as the scheduler gives it)."""

    component = "transformer"
    model_class = "SD3Transformer2DModel"
    controlnet_class = "SD3ControlNetModel"
    lora_targets = SD3_LORA_TARGETS
    conv_targets: tuple[str, ...] = ()
    micro_conditioning = False
    # No kohya LoRA file: ComfyUI reads SD 3.x LoRAs in diffusers' layout (comfy/lora.py's "transformer." keys).
    # LyCORIS (LoHa/LoKr) files name diffusers' modules with "lycoris_" (SimpleTuner's layout, which ComfyUI reads).
    kohya_lora = None
    kohya_prefix = "lycoris_"
    diffusers_lora_keys = False  # PEFT's own key names, as train_dreambooth_lora_sd3.py saves them
    # A ControlNet's conditioning: the image's VAE latents, shifted and scaled as the latents are
    # (train_controlnet_sd3.py / _flux.py), passed to the ControlNet pipeline as ``control_image``.
    control_latents = True
    control_image_argument = "control_image"

    def predict(self, transformer, noisy, timesteps, embeds, batch: Any, residuals=None):
        return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                           pooled_projections=batch.pooled_embeds.to(embeds.dtype),
                           block_controlnet_hidden_states=residuals, return_dict=False)[0]

    def control(self, controlnet, noisy, timesteps, embeds, batch: Any, image):
        """The ControlNet's block residuals from the conditioning image's latents (train_controlnet_sd3.py encodes
        the conditioning image with the VAE; ``image`` here is that latent)."""
        samples = controlnet(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                             pooled_projections=batch.pooled_embeds.to(embeds.dtype),
                             controlnet_cond=image.to(noisy.dtype), return_dict=False)[0]
        return [s.to(noisy.dtype) for s in samples]

    def controlnet_from(self, transformer, vae_scale_factor: int):
        """A ControlNet from the transformer's first blocks (train_controlnet_sd3.py: ``from_transformer``, its
        default 12 blocks and no extra conditioning channels), never the last, context-only block (its text stream
        ends there, a ControlNet block's does not). ``from_transformer`` edits the config it reads: it is given a
        copy."""
        from diffusers import SD3ControlNetModel

        layers = min(12, transformer.config.num_layers - 1)
        return SD3ControlNetModel.from_transformer(_ConfigCopy(transformer), num_layers=layers,
                                                   num_extra_conditioning_channels=0)


class FluxDenoiser:
    """``FluxTransformer2DModel``: the latents packed into 2x2 patches (``FluxPipeline._pack_latents``) with their
    image position ids, the T5 tokens with zero text ids, the pooled CLIP embedding, the timestep / 1000, and on
    guidance-distilled models (Flux.1 dev) the guidance scale diffusers' scripts train with (3.5)."""

    component = "transformer"
    model_class = "FluxTransformer2DModel"
    controlnet_class = "FluxControlNetModel"
    lora_targets = FLUX_LORA_TARGETS
    conv_targets: tuple[str, ...] = ()
    micro_conditioning = False
    kohya_lora = "flux"  # lora_unet_double_blocks_* / single_blocks_* (training/kohya_flux.py)
    kohya_prefix = "lycoris_"
    diffusers_lora_keys = False  # PEFT's own key names, as train_dreambooth_lora_flux.py saves them
    # A ControlNet's conditioning: the image's VAE latents, shifted and scaled as the latents are
    # (train_controlnet_sd3.py / _flux.py), passed to the ControlNet pipeline as ``control_image``.
    control_latents = True
    control_image_argument = "control_image"
    guidance_scale = 3.5  # train_dreambooth_lora_flux.py --guidance_scale's default

    @staticmethod
    def pack(latents):
        """[B, C, H, W] -> [B, H/2 x W/2, 4C] (``FluxPipeline._pack_latents``)."""
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    @staticmethod
    def unpack(packed, height: int, width: int):
        """The inverse of :meth:`pack` for latents of ``height`` x ``width``."""
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(packed, height=height, width=width, vae_scale_factor=1)

    def _inputs(self, transformer, noisy, timesteps, embeds, batch: Any) -> dict[str, Any]:
        import torch
        from diffusers import FluxPipeline

        b, _, h, w = noisy.shape
        guidance = None
        if _config(transformer).guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=noisy.device, dtype=noisy.dtype)
        return {"timestep": timesteps.to(noisy.dtype) / 1000, "guidance": guidance,
                "pooled_projections": batch.pooled_embeds.to(embeds.dtype), "encoder_hidden_states": embeds,
                "txt_ids": torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                "img_ids": FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)}

    def predict(self, transformer, noisy, timesteps, embeds, batch: Any, residuals=None):
        blocks, single = residuals if residuals is not None else (None, None)
        out = transformer(hidden_states=self.pack(noisy), **self._inputs(transformer, noisy, timesteps, embeds, batch),
                          controlnet_block_samples=blocks, controlnet_single_block_samples=single,
                          return_dict=False)[0]
        return self.unpack(out, *noisy.shape[2:])

    def control(self, controlnet, noisy, timesteps, embeds, batch: Any, image):
        """The ControlNet's residuals for both block stacks from the conditioning image's latents, packed as the
        noisy latents are (train_controlnet_flux.py)."""
        blocks, single = controlnet(hidden_states=self.pack(noisy), controlnet_cond=self.pack(image.to(noisy.dtype)),
                                    **self._inputs(controlnet, noisy, timesteps, embeds, batch), return_dict=False)
        return ([s.to(noisy.dtype) for s in blocks] if blocks is not None else None,
                [s.to(noisy.dtype) for s in single] if single is not None else None)

    def controlnet_from(self, transformer, vae_scale_factor: int):
        """A ControlNet with the transformer's attention and its first blocks (train_controlnet_flux.py: 4 double
        and 4 single blocks, or as many as the transformer has)."""
        from diffusers import FluxControlNetModel

        config = transformer.config
        return FluxControlNetModel.from_transformer(
            transformer, num_layers=min(4, config.num_layers), num_single_layers=min(4, config.num_single_layers),
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads)


class _ConfigCopy:
    """A transformer seen through a copy of its config: ``SD3ControlNetModel.from_transformer`` sets ``num_layers``
    in the config dict it is given, which would change the transformer's own."""

    def __init__(self, transformer):
        from diffusers.configuration_utils import FrozenDict

        self._transformer = transformer
        self.config = FrozenDict(dict(transformer.config))

    def __getattr__(self, name):
        return getattr(self._transformer, name)


class FlowMatchingObjective:
    """Rectified flow: each row gets a noise level sigma in [0, 1] (the training scheduler's sigma at a timestep drawn
    by ``compute_density_for_timestep_sampling``: ``logit_normal`` (mean 0, std 1), ``mode`` (scale 1.29) or uniform),
    the denoiser sees ``(1 - sigma) x latents + sigma x noise`` and is trained on the velocity ``noise - latents``.
    SD3's script preconditions the output (``--precondition_outputs``, its default): the prediction is turned into
    an estimate of the clean latents, ``noisy - sigma x prediction``, and compared with the latents. The loss
    weighting is ``compute_loss_weighting_for_sd3`` of the same scheme (ones for ``logit_normal``, ``mode`` and
    ``none``)."""

    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    supports_snr_gamma = False

    def __init__(self, weighting_scheme: str, precondition_outputs: bool, logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        self.weighting_scheme, self.precondition_outputs = weighting_scheme, precondition_outputs
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    def configured(self, cfg) -> FlowMatchingObjective:
        """This objective with a training config's timestep sampling (``TrainConfig.weighting_scheme``, unset = this
        family's; ``logit_mean``, ``logit_std``, ``mode_scale``); ValueError for a setting it has no use for."""
        if cfg.snr_gamma:
            raise ValueError(f"snr_gamma = {cfg.snr_gamma} weights DDPM's loss by signal-to-noise ratio; this base "
                             "model is trained by flow matching, whose timesteps and weights weighting_scheme sets "
                             "(logit_normal, mode, none, sigma_sqrt, cosmap): unset snr_gamma")
        return FlowMatchingObjective(cfg.weighting_scheme or self.weighting_scheme, self.precondition_outputs,
                                     cfg.logit_mean, cfg.logit_std, cfg.mode_scale)

    def noisy_input(self, scheduler, latents, noise, noise_in, generator) -> Noised:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, latents.shape[0], self.logit_mean,
                                                  self.logit_std, self.mode_scale, device=latents.device,
                                                  generator=generator)
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps.to(latents.device)[indices]
        sigmas = scheduler.sigmas.to(latents.device, latents.dtype)[indices]
        sigmas = sigmas.reshape(-1, *[1] * (latents.ndim - 1))
        noisy = (1.0 - sigmas) * latents + sigmas * noise_in
        return Noised(noisy, timesteps, latents if self.precondition_outputs else noise - latents, sigmas)

    def prediction(self, pred, noised: Noised):
        return pred * (-noised.sigmas) + noised.noisy if self.precondition_outputs else pred

    def loss_weights(self, scheduler, noised: Noised, snr_gamma: float | None):
        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None  # compute_loss_weighting_for_sd3 gives ones
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting_scheme, noised.sigmas).flatten()
