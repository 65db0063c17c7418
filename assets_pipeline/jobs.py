import dagster as dg

from assets_pipeline.partitions.definitions import concepts_partitions

# Everything per concept that exists so far: the dataset chain and its latents.
build_concept_job = dg.define_asset_job(
    "build_concept",
    selection=dg.AssetSelection.groups("dataset", "latents"),
    partitions_def=concepts_partitions,
    description="Build one concept's dataset assets and latents (partition = concept folder name).",
)
