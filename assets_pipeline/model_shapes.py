"""Random-weight Stable Diffusion pipelines at real sizes, for benchmarks and the GPU end-to-end run.

No weights can be downloaded here, so speed and memory are measured on models with the published shapes and
random weights: the compute and memory of a step do not depend on the weights' values. ``tiny`` is the
embedded model (what the CPU test suite trains); ``sd15`` has Stable Diffusion 1.5's shapes (the config.json of
each component of runwayml/stable-diffusion-v1-5: U-Net 859.5 M parameters, VAE 83.7 M, CLIP ViT-L/14 text
tower 123.1 M).
"""

from __future__ import annotations

from pathlib import Path

SHAPES = ("tiny", "sd15")
RESOLUTION = {"tiny": 64, "sd15": 512}


def build_pipeline(shapes: str, device: str = "cpu", seed: int = 0):
    """The pipeline with ``shapes``, weights initialized directly on ``device`` (seconds on a GPU, minutes for
    SD 1.5 on a small CPU). Tokenizer and scheduler are the embedded model's: SD 1.x's vocabulary and config."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from assets_pipeline.base_model import build_embedded_pipeline

    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {SHAPES}, got {shapes!r}")
    tiny = build_embedded_pipeline()
    if shapes == "tiny":
        return tiny.to(device)
    torch.manual_seed(seed)
    with torch.device(device):
        # UNet2DConditionModel's defaults are SD 1.x's blocks; only the text width differs (768 for ViT-L/14).
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny.tokenizer, unet=unet,
                                   scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_model_folder(shapes: str, folder: Path, device: str = "cpu", dtype: str = "float32") -> Path:
    """Save the pipeline as a diffusers folder (what ``base_model.source`` points at), once: an existing complete
    folder is reused. Written beside and renamed into place, so a folder that exists is complete."""
    import shutil

    import torch

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = build_pipeline(shapes, device)
    pipe.to(dtype=getattr(torch, dtype))
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder
