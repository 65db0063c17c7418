"""Training: one loop (``loop.py``) and one small module per method (``methods/``), registered by name.

The trainer runs in its own process (``python -m assets_pipeline.training``), launched by the model assets
through Dagster Pipes, so GPU memory is returned after every training; it is also a plain CLI.
"""
