"""Declarative dataset-to-model build system for Stable Diffusion fine-tuning, orchestrated by Dagster.

Layers (arrows point one way): the Dagster layer (``assets``, ``sensors``, ``definitions``) calls pure stage
functions (``stages``), which use plain helpers (``store``, ``hashing``, ``base_model``). ``resources`` and
``partitions`` hold the Dagster resources and the concept partitions. Nothing here imports torch at module import.
"""
