import dagster as dg

from assets_pipeline.partitions.definitions import concepts_partitions

# Every run of a job that trains carries this tag. The team instance (dagster_home/dagster.postgres.yaml) limits
# in-progress runs with it to one per GPU (`concurrency: runs: tag_concurrency_limits`): a second training run
# waits QUEUED, holding no worker and no memory, while dataset runs (untagged) go on. The `gpu` pool still
# serializes the GPU steps themselves, whichever run they belong to.
TRAINING_RUN_TAGS = {"assets_pipeline/training": "true"}

# What the concept-folder sensor runs: ingest only. Declarative automation takes it from there, rebuilding
# downstream assets only where raw_images' data version changed.
ingest_concept_job = dg.define_asset_job(
    "ingest_concept",
    selection=dg.AssetSelection.assets("raw_images"),
    partitions_def=concepts_partitions,
    description="Ingest one concept folder (partition = concept folder name).",
    # One cheap step (no model, no GPU): run it in the run worker itself rather than in a step process.
    executor_def=dg.in_process_executor,
)

# One concept's trained outputs (from the launchpad or the CLI). The retraining schedule launches runs of
# train_packs instead (assets/packs.py): several concepts per run where they can share a pack.
train_models_job = dg.define_asset_job(
    "train_models",
    selection=dg.AssetSelection.groups("models"),
    partitions_def=concepts_partitions,
    description="Train the given concept's outputs from its current latents.",
    tags=TRAINING_RUN_TAGS,
)

# One concept's dataset chain, priors and latents: cheap, run whenever its photos change.
build_concept_job = dg.define_asset_job(
    "build_concept",
    selection=dg.AssetSelection.groups("dataset", "priors", "latents"),
    partitions_def=concepts_partitions,
    description="Build one concept's dataset assets, class images and latents (partition = concept folder).",
)

# Everything for one concept, trained outputs and their checks included (methods it doesn't request skip).
train_concept_job = dg.define_asset_job(
    "train_concept",
    selection=dg.AssetSelection.groups("dataset", "priors", "latents", "models"),
    partitions_def=concepts_partitions,
    description="Build one concept end to end: datasets, latents and every method its concept.toml requests.",
    tags=TRAINING_RUN_TAGS,
)
