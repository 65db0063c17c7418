"""The U-Net families (SD 1.x/2.x, SDXL): how their denoiser is called, how a ControlNet joins it, and what it
is trained to predict (DDPM's objective, Ho et al. 2020, as diffusers' training scripts train it).

SDXL's U-Net also takes ``added_cond_kwargs``: the pooled text embedding and six size numbers, its
"micro-conditioning" (SDXL paper, section 2.2; ``addition_embed_type = "text_time"``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
PREDICTION_TYPES = (EPSILON, V_PREDICTION, "sample")  # diffusers' schedulers' `prediction_type` values
# SD's ControlNet conditioning embedding (16, 32, 96, 256) downsamples 8x with 3 stride-2 convs, matching SD's VAE;
# a model with a smaller VAE factor takes the first log2(factor) + 1 of them.
_COND_CHANNELS = (16, 32, 96, 256)


class UNetDenoiser:
    """A ``UNet2DConditionModel`` conditioned on token embeddings (``encoder_hidden_states``); with
    ``micro_conditioning`` (SDXL) also on the pooled embedding and add_time_ids."""

    component = "unet"  # the pipeline's attribute and folder
    model_class = "UNet2DConditionModel"
    controlnet_class = "ControlNetModel"
    # LoRA's default targets, the attention projections (diffusers' train_dreambooth_lora.py), and LoCon's
    # convolutions of the ResNet blocks (kohya's conv_dim).
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    conv_targets = ("conv1", "conv2", "conv_shortcut")
    # The kohya/A1111 LoRA file's layout for this network (training/methods/lora.py's KOHYA_WRITERS) and the
    # prefix of its modules in kohya/LyCORIS files (kohya-ss sd-scripts' networks/lora.py).
    kohya_lora = "sd"
    kohya_prefix = "lora_unet_"
    # Its LoRA saved with diffusers' own key names (``convert_state_dict_to_diffusers``), as the U-Net scripts save.
    diffusers_lora_keys = True
    # A ControlNet's conditioning: the image itself ([0, 1], its own conditioning encoder), passed to the
    # ControlNet pipeline as ``image`` (train_controlnet.py).
    control_latents = False
    control_image_argument = "image"

    def __init__(self, micro_conditioning: bool):
        self.micro_conditioning = micro_conditioning

    def kwargs(self, batch: Any, dtype) -> dict:
        """The U-Net's extra conditioning: SDXL's ``added_cond_kwargs`` (pooled text embedding and add_time_ids,
        in the embeddings' dtype as train_dreambooth_lora_sdxl.py casts them), nothing for SD 1.x/2.x."""
        if not self.micro_conditioning:
            return {}
        if batch.pooled_embeds is None or batch.time_ids is None:
            raise ValueError("an SDXL U-Net needs the batch's pooled text embeddings and add_time_ids: the latents "
                             "bundle has none (made before SDXL support?); rematerialize vae_latents")
        return {"added_cond_kwargs": {"text_embeds": batch.pooled_embeds.to(dtype),
                                      "time_ids": batch.time_ids.to(dtype)}}

    def predict(self, unet, noisy, timesteps, embeds, batch, residuals=None):
        """The U-Net's prediction; ``residuals``: a ControlNet's (:meth:`control`), added to its skip connections."""
        extra = self.kwargs(batch, embeds.dtype)
        if residuals is not None:
            down, mid = residuals
            extra.update(down_block_additional_residuals=[d.to(noisy.dtype) for d in down],
                         mid_block_additional_residual=mid.to(noisy.dtype))
        return unet(noisy, timesteps, encoder_hidden_states=embeds, **extra).sample

    def control(self, controlnet, noisy, timesteps, embeds, batch, image):
        """A ControlNet's residuals for the U-Net, from the conditioning image ``image`` [B, 3, H, W] in [0, 1]
        (train_controlnet.py; SDXL: the ControlNet takes the same added_cond_kwargs, train_controlnet_sdxl.py)."""
        return controlnet(noisy, timesteps, encoder_hidden_states=embeds, controlnet_cond=image.to(noisy.dtype),
                          return_dict=False, **self.kwargs(batch, embeds.dtype))

    def controlnet_from(self, unet, vae_scale_factor: int):
        """A ControlNet initialized from the U-Net's encoder (``ControlNetModel.from_unet``, which copies SDXL's
        text_time conditioning too), its conditioning embedding downsampling as the VAE does."""
        from diffusers import ControlNetModel

        n = int(math.log2(vae_scale_factor)) + 1
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=_COND_CHANNELS[:n])


def sdxl_add_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                      target_size: tuple[int, int], dtype=None):
    """SDXL's micro-conditioning for one image, shape (1, 6): the photo's size before resizing (height, width),
    the top-left corner of the crop taken from it (top, left) and the training size (height, width), in that
    order (diffusers' ``StableDiffusionXLPipeline._get_add_time_ids``; SDXL paper, section 2.2). ``dtype`` None
    keeps them integers, as train_dreambooth_lora_sdxl.py's ``compute_time_ids`` does before casting."""
    import torch

    pairs = (original_size, crop_top_left, target_size)
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"add_time_ids need three (int, int) pairs; got {pairs}")
    # operator.index accepts any integer (numpy's from a table too) and rejects floats, which would be a bug.
    return torch.tensor([[operator.index(v) for pair in pairs for v in pair]], dtype=dtype)


@dataclass
class Noised:
    """One draw of an objective for a batch: the denoiser's input, its timesteps, what the prediction is compared
    with, and (flow matching) each row's noise level."""

    noisy: Any
    timesteps: Any
    target: Any
    sigmas: Any = None


class DenoisingObjective:
    """DDPM's objective: a timestep per row, the latents noised to it by the scheduler's forward process, and the
    target the scheduler's ``prediction_type`` names: the noise (epsilon) or the velocity (v-prediction, Salimans
    & Ho 2022). The training scheduler is ``DDPMScheduler`` built from the pipeline's scheduler config, as in
    diffusers' scripts."""

    scheduler_class = "DDPMScheduler"
    supports_snr_gamma = True

    def configured(self, cfg) -> DenoisingObjective:
        """This objective for a training config (``TrainConfig``); ValueError for a setting it has no use for."""
        if cfg.weighting_scheme is not None:
            raise ValueError(f"weighting_scheme = {cfg.weighting_scheme!r} is a flow-matching setting (SD 3.x, Flux); "
                             "this base model is trained with DDPM's objective: unset it (snr_gamma weights the "
                             "loss here)")
        return self

    def noisy_input(self, scheduler, latents, noise, noise_in, generator) -> Noised:
        """``noise_in`` is what the latents are noised with (``noise`` unless input perturbation changed it); the
        target stays ``noise``. The timesteps are drawn from ``generator`` after the noise, in diffusers' scripts'
        order."""
        import torch

        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                                  device=latents.device)
        noisy = scheduler.add_noise(latents, noise_in, timesteps)
        v_pred = scheduler.config.prediction_type == V_PREDICTION
        target = scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
        return Noised(noisy, timesteps, target)

    def prediction(self, pred, noised: Noised):
        """What the denoiser's output is compared with the target as: itself."""
        return pred

    def loss_weights(self, scheduler, noised: Noised, snr_gamma: float | None):
        """Min-SNR-gamma weights (Hang et al. 2023) as in diffusers' train_text_to_image.py, or None (unweighted)."""
        if not snr_gamma:
            return None
        import torch
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, noised.timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        if scheduler.config.prediction_type == V_PREDICTION:
            return weights / (snr + 1)
        return weights / snr
