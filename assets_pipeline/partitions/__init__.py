"""Concepts: the folder format (``concept_spec``, pure) and the Dagster partitions over them (``definitions``)."""
