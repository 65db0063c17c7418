"""Random-weight Stable Diffusion pipelines at real sizes, for benchmarks and the GPU end-to-end run.

No weights can be downloaded here, so speed and memory are measured on models with the published shapes and
random weights: the compute and memory of a step do not depend on the weights' values. ``tiny`` is the
embedded model (what the CPU test suite trains); ``sd15`` has Stable Diffusion 1.5's shapes (the config.json of
each component of runwayml/stable-diffusion-v1-5: U-Net 859.5 M parameters, VAE 83.7 M, CLIP ViT-L/14 text
tower 123.1 M); ``sdxl`` has SDXL base 1.0's (stabilityai/stable-diffusion-xl-base-1.0: U-Net 2567.5 M with
text_time conditioning, the same VAE at SDXL's scaling factor, CLIP ViT-L/14 123.1 M and OpenCLIP ViT-bigG/14
694.7 M text towers), with the embedded SDXL model's tokenizers and scheduler.
"""

from __future__ import annotations

from pathlib import Path

SHAPES = ("tiny", "sd15", "sdxl")
RESOLUTION = {"tiny": 64, "sd15": 512, "sdxl": 1024}
# Each published model's parameter count per component (what tests/test_model_shapes.py holds the builds to).
PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


def _clip_text_config(width: int, layers: int, heads: int, act: str, pad_id: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads,
                          num_hidden_layers=layers, max_position_embeddings=77, projection_dim=projection_dim,
                          hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id)


def build_unet(shapes: str):
    """The U-Net of ``sd15`` or ``sdxl`` (random weights, on torch's current default device)."""
    from diffusers import UNet2DConditionModel

    if shapes == "sdxl":  # unet/config.json of SDXL base 1.0
        return UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)  # 6 time ids x 256 + the pooled 1280
    if shapes == "sd15":  # UNet2DConditionModel's defaults are SD 1.x's blocks; only the text width differs (768)
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    raise ValueError(f"build_unet: shapes must be 'sd15' or 'sdxl' (tiny is the embedded model), got {shapes!r}")


def build_pipeline(shapes: str, device: str = "cpu", seed: int = 0):
    """The pipeline with ``shapes``, weights initialized directly on ``device`` (seconds on a GPU, minutes for
    SD 1.5 on a small CPU; ``meta`` allocates nothing). Tokenizers and scheduler are the embedded SD 1.x or SDXL
    model's: the real vocabulary and the published scheduler config."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from assets_pipeline.base_model import build_embedded_pipeline, build_embedded_sdxl_pipeline

    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {SHAPES}, got {shapes!r}")
    if shapes == "tiny":
        return build_embedded_pipeline().to(device)
    sdxl = shapes == "sdxl"
    small = build_embedded_sdxl_pipeline() if sdxl else build_embedded_pipeline()  # tokenizers and scheduler
    torch.manual_seed(seed)
    with torch.device(device):
        unet = build_unet(shapes)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=RESOLUTION[shapes],
                            **({"scaling_factor": 0.13025, "force_upcast": True} if sdxl else {}))
        # CLIP ViT-L/14's text tower (pads with <|endoftext|>), in both.
        text_encoder = CLIPTextModel(_clip_text_config(768, 12, 12, "quick_gelu", 49407, 768))
        if sdxl:  # OpenCLIP ViT-bigG/14's, with its projection (pooled embeddings); pads with "!" (id 0)
            text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(1280, 32, 20, "gelu", 0, 1280))
    if sdxl:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=small.tokenizer, tokenizer_2=small.tokenizer_2, unet=unet,
                                         scheduler=small.scheduler, force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=small.tokenizer, unet=unet,
                                   scheduler=small.scheduler, safety_checker=None, feature_extractor=None,
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
