"""Base models: one package for what a base model is and how it is found, built and loaded.

- ``families.py``: the family table (SD 1.x, SD 2.x, SDXL). A family carries every choice the code makes for a
  kind of base model: its pipeline and ControlNet classes, its denoiser and how it is called, its text encoders
  and how a prompt becomes conditioning, and what the denoiser is trained to predict. No module outside this
  package branches on a family's name; a new family is a row here plus, for a new kind of network, a module
  like ``unet.py``.
- ``text.py`` / ``unet.py``: the prompt encodings and the U-Net denoiser and objective the rows name.
- ``detect.py``: a model's family from its configs (a diffusers folder's JSON, a checkpoint's key names).
- ``embedded.py``: the random-weight models built offline, one spec table for the tiny test models and the
  real-size shapes the benchmarks train.
- ``resolve.py``: a configured source -> :class:`~assets_pipeline.models.resolve.BaseModelRef` (and fingerprints).
- ``load.py``: a reference -> a pipeline, or named components (VAE, denoiser, text encoders, tokenizers).

Nothing heavy is imported at module level: torch, diffusers and transformers load inside the functions.
"""
