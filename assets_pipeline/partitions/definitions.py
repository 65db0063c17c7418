import dagster as dg

# One partition per concept folder; keys are validated folder names (see concept_spec.CONCEPT_KEY).
concepts_partitions = dg.DynamicPartitionsDefinition(name="concepts")
