import warnings

import dagster as dg

# Per-concept asset checks need partitioned checks, a Dagster preview feature; said once here, not per check.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)
# The folders are an observable source asset (assets/dataset.py concept_folders), a Dagster beta; said once here.
warnings.filterwarnings("ignore", message="Function `observable_source_asset` is currently in beta",
                        category=dg.BetaWarning)

# One partition per concept folder; keys are validated folder names (see concept_spec.CONCEPT_KEY).
concepts_partitions = dg.DynamicPartitionsDefinition(name="concepts")
