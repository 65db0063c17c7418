"""Training: one loop (``loop.py``) and one small module per method (``methods/``), registered by name.

The trainer runs in its own process (``python -m assets_pipeline.training``), launched by the model assets
through Dagster Pipes, so GPU memory is returned after every training; it is also a plain CLI.
"""

import sys

# The single-process trainer's command line, and the variables every launcher adds to its environment
# (resources/models.py TrainerLauncher, resources/spare_trainer.py, reproduce.py).
TRAINER = (sys.executable, "-m", "assets_pipeline.training")
TRAINER_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
