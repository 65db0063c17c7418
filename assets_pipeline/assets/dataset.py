"""Dataset assets: raw_images -> captioned_images -> filtered_images -> clip_scored_images -> control_images."""


import dataclasses
import textwrap
from pathlib import Path

import dagster as dg

from assets_pipeline.assets.common import (
    clean_stale_temporaries, dataset_asset, expect_training_if_changed, image_preview as _preview, read_upstream,
    restore_images, result, save_table, spec_from_snapshot, table_preview,
)
from assets_pipeline.automation import rebuild_on_change, rebuild_on_folder_change
from assets_pipeline.display import printable, shown
from assets_pipeline.hashing import digest
from assets_pipeline.partitions.concept_spec import load_concept_spec
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import (
    AcceleratorResource, BaseModelResource, CaptionerResource, ClipScorerResource, PipelineStorage,
)
from assets_pipeline.store import SPEC_SNAPSHOT, atomic_dir, write_json_atomic
from assets_pipeline.tables import table_version, write_imagefolder

GROUP = "dataset"


def _imagefolder_rows(df, control: bool = False) -> list[dict]:
    """Rows for tables.write_imagefolder: each photo named by its sha256, with its caption (and control image)."""
    rows = []
    for r in df.itertuples():
        name = f"{r.image_sha256[:16]}.png"
        row = {"image": r.decoded_path, "file_name": name, "text": r.caption}
        if control:
            row.update(conditioning_image=r.control_path, conditioning_image_file_name=f"conditioning/{name}")
        rows.append(row)
    return rows


@dg.observable_source_asset(partitions_def=concepts_partitions, group_name=GROUP)
def concept_folders(context, storage: PipelineStorage) -> dg.DataVersionsByPartition:
    """A concept's folder under the data root, as a data version: the digest of every file's path, size and
    modification time. The concept sensor reports a new one for each folder that changed (one observation per
    change); observing from here reads every registered concept's folder in full. Its new data version is what
    rebuilds the concept's `raw_images`."""
    from assets_pipeline.partitions.discovery import scan_concepts

    registered = set(context.instance.get_dynamic_partitions(concepts_partitions.name))
    found = scan_concepts(storage.data_path())
    return dg.DataVersionsByPartition({c: d for c, d in found.concepts.items() if c in registered})


@dataset_asset(partitions_def=concepts_partitions, group_name=GROUP, code_version="2", kinds={"python"},
               deps=[concept_folders], automation_condition=rebuild_on_folder_change())
def raw_images(context: dg.AssetExecutionContext, storage: PipelineStorage) -> dg.MaterializeResult:
    """Every file of the concept folder: decoded photos (manifest) or rejects with a reason; and the concept's own
    ControlNet conditioning images (`control/<photo name>.<ext>`), each checked and paired with its photo
    (`pairs.parquet`; a pair that cannot be used is a reject with its reason)."""
    from assets_pipeline.stages.conditioning import ControlConfig
    from assets_pipeline.stages.ingest import MANIFEST_COLUMNS, PAIR_COLUMNS, IngestConfig, PairRules, ingest_concept

    concept = context.partition_key
    folder = storage.concept_dir(concept)
    spec = load_concept_spec(folder)
    layout = storage.layout()
    clean_stale_temporaries(context, storage, concept, "raw_images", caches=("images", "thumbnails"))
    control = spec.config("control", ControlConfig())
    res = ingest_concept(folder, storage.data_path(), layout.cache("images", ".png"), IngestConfig(),
                         PairRules(use=control.source != "annotator",
                                   max_aspect_difference=control.max_aspect_difference))
    out = layout.asset_dir(concept, "raw_images")
    with atomic_dir(out) as tmp:
        save_table(storage, res.manifest, tmp / "manifest.parquet")
        save_table(storage, res.rejects, tmp / "rejects.parquet")
        save_table(storage, res.pairs, tmp / "pairs.parquet")
        write_json_atomic(tmp / SPEC_SNAPSHOT, dataclasses.asdict(spec))
    for r in res.rejects.itertuples():
        context.log.warning(printable(f"rejected {r.source_path}: {r.reason}"))  # names from a folder
    version_cols = [c for c in MANIFEST_COLUMNS if c != "decoded_path"]
    version = digest(table_version(res.manifest, version_cols), dataclasses.asdict(spec))
    if len(res.pairs):  # only then: a concept without control/ keeps the version it had
        version = digest(version, table_version(res.pairs, [c for c in PAIR_COLUMNS if c != "control_decoded_path"]))
    expect_training_if_changed(context, storage, version)
    return result(
        out, version, len(res.manifest), {
            **res.cache_counts,
            **({"conditioning_pairs": len(res.pairs)} if len(res.pairs) or control.from_folder(folder) else {}),
            "rejected": len(res.rejects),
            "rejects": table_preview(res.rejects, ["source_path", "reason"], rows=50),
            "preview": _preview(layout, res.manifest["decoded_path"]),
        },
    )


@dataset_asset(partitions_def=concepts_partitions, group_name=GROUP, code_version="1", deps=[raw_images],
               kinds={"python"}, automation_condition=rebuild_on_change())
def captioned_images(
    context: dg.AssetExecutionContext, storage: PipelineStorage, captioner: CaptionerResource,
    accelerator: AcceleratorResource, base_model: BaseModelResource,
) -> dg.MaterializeResult:
    """A caption per photo: sidecar .txt > captioner model > 'a photo of {token} {class_noun}'. Captions longer
    than the base model's text encoder reads are warned about, one by one (it truncates them).

    Metadata: `captions_from_sidecar` / `_model` / `_template` say where each row's caption came from. Only
    model captions are worth caching (a captioner forward pass each): `items_computed` counts those the captioner
    wrote now, `items_cached` those read from the caption cache, and `items_not_cached` the sidecar and template
    captions, which are read or written on every build at no cost; the three add up to the rows. Without a
    captioner (the `captioner` resource unset, or `use_captioner = false`) every row is not cached."""
    from assets_pipeline.stages.captions import CaptionConfig, caption_images

    concept = context.partition_key
    spec = spec_from_snapshot(storage, concept)
    layout = storage.layout()
    cfg = spec.config("captions", CaptionConfig())
    model = captioner.load(layout.root, accelerator.device, cfg.max_new_tokens) if cfg.use_captioner else None
    cache = layout.cache("captions", ".txt")
    clean_stale_temporaries(context, storage, concept, "captioned_images", caches=(cache.kind, "caption_lengths"))
    manifest = read_upstream(storage, concept, "raw_images", "manifest.parquet")
    restored = restore_images(context, storage, concept, manifest)
    df = caption_images(manifest, spec, cache, model, cfg)
    out = layout.asset_dir(concept, "captioned_images")
    with atomic_dir(out) as tmp:
        save_table(storage, df, tmp / "captions.parquet")
        write_imagefolder(tmp / "imagefolder", _imagefolder_rows(df))
    missing_token = df[~df["has_token"]]
    if len(missing_token):
        context.log.warning(f"{len(missing_token)} captions lack the token {spec.token!r}: "
                            f"{list(missing_token['source_path'])}")
    overlong, limit = _overlong(layout, base_model.resolve(layout.root, spec), df)
    for r in overlong.itertuples():
        context.log.warning(f"{r.caption_source} caption of {printable(r.source_path)} is {r.tokens} tokens, over "
                            f"the text encoder's {limit} (start and end included): it is truncated, never seeing "
                            f"{textwrap.shorten(r.cut, 160, placeholder=' ...')!r}")
    sources = df["caption_source"].value_counts().to_dict()
    return result(out, table_version(df, ["image_sha256", "caption"]), len(df), {
        **cache.counts(), "items_not_cached": int((df["caption_source"] != "model").sum()), **restored,
        **{f"captions_from_{k}": int(sources.get(k, 0)) for k in ("sidecar", "model", "template")},
        "captions_truncated": len(overlong),
        "caption_token_limit": limit,
        "preview": table_preview(df, ["source_path", "caption_source", "caption"]),
    })


def _overlong(layout, ref, df):
    """(the captions the text encoder truncates, its token limit). The count is cached per tokenizer and set of
    captions (``caption_lengths``), so a rebuild with nothing changed loads neither transformers nor the
    tokenizer (~2 s of a no-op rebuild)."""
    import json

    import pandas as pd

    from assets_pipeline.hashing import digest
    from assets_pipeline.models.load import load_tokenizers
    from assets_pipeline.models.resolve import component_fingerprint
    from assets_pipeline.stages.captions import OVERLONG_COLUMNS, overlong_captions

    key = digest("overlong_captions", component_fingerprint(ref, ref.model_family.text_encoders[0].tokenizer,
                                                            layout.root),
                 df[["source_path", "caption_source", "caption"]].values.tolist())

    def count(tmp):
        tokenizer = load_tokenizers(ref)[0]
        rows = overlong_captions(df, tokenizer).to_dict("records")
        tmp.write_text(json.dumps({"limit": tokenizer.model_max_length, "rows": rows}, ensure_ascii=False))

    found = json.loads(layout.cache("caption_lengths", ".json").get_or_create(key, count).read_text())
    return pd.DataFrame(found["rows"], columns=OVERLONG_COLUMNS), found["limit"]


@dataset_asset(partitions_def=concepts_partitions, group_name=GROUP, code_version="1", deps=[captioned_images],
               kinds={"python"}, automation_condition=rebuild_on_change())
def filtered_images(
    context: dg.AssetExecutionContext, storage: PipelineStorage, base_model: BaseModelResource
) -> dg.MaterializeResult:
    """Quality filter: minimum side, blur, near-duplicates, aspect ratio; dropped photos keep their reasons."""
    from assets_pipeline.stages.curation import QualityConfig, filter_images

    concept = context.partition_key
    spec = spec_from_snapshot(storage, concept)
    layout = storage.layout()
    cfg = spec.config("quality", QualityConfig())
    resolution = base_model.resolve(layout.root, spec).resolution
    cache = layout.cache("quality_metrics", ".json")
    clean_stale_temporaries(context, storage, concept, "filtered_images", caches=(cache.kind,))
    captions = read_upstream(storage, concept, "captioned_images", "captions.parquet")
    manifest = read_upstream(storage, concept, "raw_images", "manifest.parquet")
    restored = restore_images(context, storage, concept, captions)
    df = filter_images(captions, manifest, cfg, resolution, cache)
    kept = df[df["kept"]]
    out = layout.asset_dir(concept, "filtered_images")
    with atomic_dir(out) as tmp:
        save_table(storage, df, tmp / "filtered.parquet")
        write_imagefolder(tmp / "imagefolder", _imagefolder_rows(kept))
    for r in df[~df["kept"]].itertuples():
        context.log.info(printable(f"dropped {r.source_path}: {r.reason}"))
    return result(out, table_version(kept, ["image_sha256", "caption"]), len(kept), {
        **cache.counts(), **restored,
        "dropped": int((~df["kept"]).sum()),
        "min_side": cfg.min_side or resolution,
        "dropped_table": table_preview(df[~df["kept"]], ["source_path", "reason"], rows=50),
        "preview": _preview(layout, kept["decoded_path"]),
    })


@dataset_asset(partitions_def=concepts_partitions, group_name=GROUP, code_version="1", deps=[filtered_images],
               kinds={"python"}, automation_condition=rebuild_on_change())
def clip_scored_images(
    context: dg.AssetExecutionContext, storage: PipelineStorage, clip_scorer: ClipScorerResource,
    accelerator: AcceleratorResource,
) -> dg.MaterializeResult:
    """open_clip image-caption score per kept photo, and the quality subset the trainers use."""
    from assets_pipeline.stages.scoring import ScoringConfig, score_images

    concept = context.partition_key
    spec = spec_from_snapshot(storage, concept)
    layout = storage.layout()
    cfg = spec.config("scoring", ScoringConfig())
    scorer = clip_scorer.load(layout.root, accelerator.device)  # "auto" is resolved if a model is loaded
    cache = layout.cache("clip_scores", ".json")
    clean_stale_temporaries(context, storage, concept, "clip_scored_images", caches=(cache.kind,))
    filtered = read_upstream(storage, concept, "filtered_images", "filtered.parquet")
    restored = restore_images(context, storage, concept, filtered[filtered["kept"]])
    df = score_images(filtered, scorer, cache, cfg)
    subset = df[df["in_subset"]]
    if scorer.is_random and cfg.min_score is None and cfg.top_fraction is None:
        context.log.warning("CLIP scorer has random weights (the embedded default): its scores are meaningless, "
                            "so the quality subset keeps every kept photo. Configure a pretrained scorer.")
    out = layout.asset_dir(concept, "clip_scored_images")
    with atomic_dir(out) as tmp:
        save_table(storage, df, tmp / "scores.parquet")
        write_imagefolder(tmp / "imagefolder", _imagefolder_rows(subset))
    return result(out, table_version(subset, ["image_sha256", "caption"]), len(subset), {
        **cache.counts(), **restored,
        "scored": len(df),
        "scorer_is_random": scorer.is_random,
        "mean_clip_score": shown(float(df["clip_score"].mean())) if len(df) else 0.0,
        "preview": table_preview(df.sort_values("clip_score", ascending=False),
                                 ["source_path", "clip_score", "in_subset", "reason"], rows=20),
    })


@dataset_asset(partitions_def=concepts_partitions, group_name=GROUP, code_version="4", deps=[clip_scored_images],
               kinds={"python"}, automation_condition=rebuild_on_change())
def control_images(
    context: dg.AssetExecutionContext, storage: PipelineStorage, base_model: BaseModelResource,
    accelerator: AcceleratorResource,
) -> dg.MaterializeResult:
    """ControlNet conditioning image per photo of the quality subset, at the training crop of its aspect-ratio bucket
    (the same bucket and crop as its latent in vae_latents): the concept's own (`control/<photo name>.<ext>`, paired
    at ingest; `[control] source`) or an annotator's (Canny, offline). With its own, `missing.parquet` lists each
    subset photo without a valid one and why (the blocking check control_pairs_valid). Preview: each photo beside
    its conditioning image."""
    from assets_pipeline.stages.conditioning import ControlConfig, make_control_images, pair_control_images
    from assets_pipeline.stages.curation import QualityConfig
    from assets_pipeline.stages.latents import LatentConfig, concept_buckets

    concept = context.partition_key
    spec = spec_from_snapshot(storage, concept)
    layout = storage.layout()
    cfg = spec.config("control", ControlConfig())
    latent_cfg = spec.config("latents", LatentConfig())
    resolution = latent_cfg.resolution or base_model.resolve(layout.root, spec).resolution
    scores = read_upstream(storage, concept, "clip_scored_images", "scores.parquet")
    cache = layout.cache("control_images", ".png")
    clean_stale_temporaries(context, storage, concept, "control_images", caches=(cache.kind,))
    restored = restore_images(context, storage, concept, scores[scores["in_subset"]])
    max_aspect = spec.config("quality", QualityConfig()).max_aspect_ratio  # as vae_latents: same buckets
    buckets = concept_buckets(latent_cfg, resolution, max_aspect)
    import pandas as pd

    subset = scores[scores["in_subset"]]
    from_folder = cfg.from_folder(storage.concept_dir(concept))
    if from_folder:
        from assets_pipeline.stages.ingest import PAIR_COLUMNS

        pairs_path = layout.asset_dir(concept, "raw_images") / "pairs.parquet"
        pairs = (read_upstream(storage, concept, "raw_images", "pairs.parquet") if pairs_path.is_file()
                 else pd.DataFrame(columns=PAIR_COLUMNS))  # raw_images from before pairs: none read yet
        pairs = pairs[pairs["image_sha256"].isin(subset["image_sha256"])]
        # Their decoded images checked (a damaged one re-decoded from control/) before they are read, as the photos'
        for key, value in restore_images(context, storage, concept, pairs.rename(columns={
                "image_sha256": "photo_sha256", "source_path": "photo_path", "control_sha256": "image_sha256",
                "control_source_path": "source_path", "control_decoded_path": "decoded_path"})).items():
            restored[f"pairs_{key}"] = value
        df, missing = pair_control_images(subset, pairs, buckets, latent_cfg.center_crop, cache)
    else:
        weights = None
        if (folder := cfg.model_folder()) is not None:  # its model's weights: part of each image's key and lineage
            from assets_pipeline.models.resolve import cached_fingerprint
            from assets_pipeline.stages.conditioning import check_model_folder

            try:  # before any photo is read
                check_model_folder(cfg)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{concept}/concept.toml {e}") from None
            weights = cached_fingerprint(folder, layout.root / "base_models" / ".fingerprints")
        df = make_control_images(subset, cfg, buckets, latent_cfg.center_crop, cache, weights,
                                 accelerator.torch_device())
        missing = pd.DataFrame(columns=["source_path", "reason"])
    out = layout.asset_dir(concept, "control_images")
    with atomic_dir(out) as tmp:
        save_table(storage, df, tmp / "control.parquet")
        save_table(storage, missing, tmp / "missing.parquet")
        write_imagefolder(tmp / "imagefolder", _imagefolder_rows(df, control=True))
    for r in missing.itertuples():
        context.log.warning(printable(f"{r.source_path}: {r.reason}"))
    # The cache file's name (its content key), not its path: the version must not depend on the artifact root.
    control_keys = df.assign(control_key=[Path(p).name for p in df["control_path"]])
    version = table_version(control_keys, ["image_sha256", "caption", "control_key"])
    if len(missing):  # which photos lack a pair decides what ControlNet may train on
        version = digest(version, table_version(missing, ["source_path"]))
    return result(out, version, len(df), {
        **cache.counts(), **restored,
        "source": "folder" if from_folder else "annotator",
        **({"photos_without_pair": len(missing)} if from_folder else {}),
        "annotator": cfg.annotator if not from_folder else "folder",
        "resolution": resolution,
        "bucket_count": int(df.groupby(["bucket_width", "bucket_height"]).ngroups),
        # each photo beside its conditioning image, three pairs a row: a wrong pair shows at a glance
        "preview": _preview(layout, [p for pair in zip(df["decoded_path"], df["control_path"]) for p in pair]),
    })
