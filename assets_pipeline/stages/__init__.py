"""Stage functions: pure Python, no Dagster import. Each takes plain inputs and returns plain outputs."""
