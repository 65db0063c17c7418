"""vae_latents: latents and text embeddings of the quality subset, what every trainer reads."""


import dagster as dg

from assets_pipeline.automation import rebuild_on_change
from assets_pipeline.assets.common import (
    clean_stale_temporaries, dataset_asset, read_upstream, restore_images, result, spec_from_snapshot,
)
from assets_pipeline.assets.dataset import clip_scored_images
from assets_pipeline.assets.priors import class_images
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import AcceleratorResource, BaseModelResource, PipelineStorage
from assets_pipeline.store import atomic_dir, check_file, link_or_copy
from assets_pipeline.tables import read_table, table_version, write_table


def _records(df) -> list[dict]:
    return df.astype(object).where(df.notna(), None).to_dict("records")


@dataset_asset(partitions_def=concepts_partitions, group_name="latents", code_version="2",
               deps=[clip_scored_images, class_images], pool="gpu", kinds={"pytorch"},
               automation_condition=rebuild_on_change())
def vae_latents(
    context: dg.AssetExecutionContext, storage: PipelineStorage, base_model: BaseModelResource,
    accelerator: AcceleratorResource,
) -> dg.MaterializeResult:
    """VAE latent distributions and CLIP text embeddings of the quality subset and the class images, keyed by
    image sha256 (latents.safetensors + index.parquet), each image at its aspect-ratio bucket; class images share
    the photos' latent cache."""
    import pandas as pd

    from assets_pipeline.stages.latents import load_encoders
    from assets_pipeline.stages.curation import QualityConfig
    from assets_pipeline.stages.bundle import bucket_counts, write_latent_bundle
    from assets_pipeline.stages.latents import LatentConfig, bundle_header, compute_latents

    concept = context.partition_key
    spec = spec_from_snapshot(storage, concept)
    layout = storage.layout()
    cfg = spec.config("latents", LatentConfig())
    ref = base_model.resolve(layout.root, spec)
    resolution = cfg.resolution or ref.resolution
    scores = read_upstream(storage, concept, "clip_scored_images", "scores.parquet")
    priors = read_upstream(storage, concept, "class_images", "class_images.parquet")
    restored = restore_images(context, storage, concept, scores[scores["in_subset"]])
    items = pd.concat([scores[scores["in_subset"]].assign(role="instance"), priors.assign(role="class")],
                      ignore_index=True)
    enc = load_encoders(ref, layout.root, accelerator.device)  # loaded, on the resolved device, only on a miss
    latent_cache, text_cache = layout.cache("latents", ".safetensors"), layout.cache("text_embeds", ".safetensors")
    clean_stale_temporaries(context, storage, concept, "vae_latents", caches=(latent_cache.kind, text_cache.kind))
    # The buckets reach the quality filter's aspect limit, so every photo it keeps has a bucket near its shape.
    max_aspect = spec.config("quality", QualityConfig()).max_aspect_ratio
    index = compute_latents(items, enc, resolution, cfg, latent_cache, text_cache, max_aspect)
    out = layout.asset_dir(concept, "vae_latents")
    # Same rows as the current bundle (its keys cover every input): keep it rather than restack every tensor,
    # if it is still intact.
    bundle = out / "latents.safetensors"
    unchanged = bundle.is_file() and (out / "index.parquet").is_file() \
        and _records(read_table(out / "index.parquet")) == _records(index)
    if unchanged and (why := check_file(bundle)) is not None:
        context.log.warning(f"discarding the current bundle {bundle}: {why}; restacking it from the caches")
        unchanged = False
    with atomic_dir(out) as tmp:
        write_table(index, tmp / "index.parquet")
        if unchanged:
            link_or_copy(bundle, tmp / "latents.safetensors")
        else:
            write_latent_bundle(index, latent_cache, text_cache, tmp / "latents.safetensors",
                                bundle_header(enc, ref, cfg, resolution), enc.family, center_crop=cfg.center_crop)
    buckets = bucket_counts(index)
    # What the text cache holds for this concept: one entry per distinct caption (T5's are the big ones).
    texts = set(index["text_key"]) | set(index["empty_text_key"].dropna())
    text_bytes = sum(text_cache.path(k).stat().st_size for k in texts)
    return result(out, table_version(index, ["image_sha256", "role", "latent_key", "text_key"]), len(index), {
        "latents_computed": latent_cache.computed, "latents_cached": latent_cache.cached,
        "text_embeds_computed": text_cache.computed, "text_embeds_cached": text_cache.cached,
        "items_computed": latent_cache.computed + text_cache.computed,
        "items_cached": latent_cache.cached + text_cache.cached,
        "items_discarded_corrupt": len(latent_cache.discarded) + len(text_cache.discarded), **restored,
        "bundle_reused": unchanged,
        "distinct_captions": len(set(index["text_key"])),
        "text_embeds_bytes": dg.MetadataValue.int(text_bytes),
        "bundle_bytes": dg.MetadataValue.int((out / "latents.safetensors").stat().st_size),
        "resolution": resolution,
        "buckets": dg.MetadataValue.md(buckets.to_markdown(index=False)),
        "bucket_count": len(buckets),
        "base_model_fingerprint": ref.fingerprint,
        "base_model_family": ref.family,
    })
