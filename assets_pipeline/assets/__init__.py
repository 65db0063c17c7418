"""The Dagster layer: thin asset definitions over the stage functions."""
