"""What the run's step processes share: imported once per run, in the multiprocess executor's fork server.

Dagster's default executor starts every step with ``spawn``: a fresh interpreter that imports torch, diffusers,
transformers, open_clip, pandas and this project again (seconds per step, most of a small build's time). The
project's process-per-step executor (``ASSETS_PIPELINE_EXECUTOR=forkserver``: ``EXECUTORS["forkserver"]`` in
``assets_pipeline/definitions.py``; the default runs steps in the run worker) uses the ``forkserver`` start method
instead and preloads this module there: each step is then a fork of a process that
has imported them all, and still its own process (a crash, or the memory a GPU step used, ends with it).

Imports only: a fork server must not have started threads or touched a GPU. The classes are named so that
diffusers' and transformers' lazy modules really load them here, not in every step.
"""

import pandas  # noqa: F401
import pyarrow.parquet  # noqa: F401
import torch  # noqa: F401
from diffusers import (  # noqa: F401
    AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline,
    StableDiffusionXLPipeline, UNet2DConditionModel,
)
from PIL import Image  # noqa: F401
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

import open_clip  # noqa: F401
from assets_pipeline import definitions  # noqa: F401  (every asset module, and dagster itself)
