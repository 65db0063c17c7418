from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, create_model

from assets_pipeline.models.embedded import EMBEDDED
from assets_pipeline.models.resolve import BASE_MODEL_ENV, BaseModelRef, resolve_base_model
from assets_pipeline.resources.k8s import K8sTrainerConfig
from assets_pipeline.training.runtime.settings import Performance


def config_from_dataclass(cls: type, name: str) -> type[dg.Config]:
    """A Dagster ``Config`` with ``cls``'s fields, defaults and help texts (``metadata["help"]``), so the launchpad
    shows each key's help and refuses unknown keys, and the help cannot drift from the dataclass the trainer
    reads. The dataclass's own checks still run on the values (:meth:`TrainerLauncher.performance_settings`)."""
    hints = typing.get_type_hints(cls)
    return create_model(name, __base__=dg.Config, __module__=__name__, __doc__=cls.__doc__, **{
        f.name: (hints[f.name], Field(default=f.default, description=f.metadata["help"]))
        for f in dataclasses.fields(cls)})


PerformanceConfig = config_from_dataclass(Performance, "PerformanceConfig")


class BaseModelResource(dg.ConfigurableResource):
    """The Stable Diffusion model everything derives from. Its fingerprint enters every downstream cache key."""

    source: str = Field(
        default="",
        description="'embedded' (tiny random SD 1.x, built offline), 'embedded-sdxl' (tiny random SDXL), a "
        "diffusers folder, a single-file checkpoint (.safetensors/.ckpt), or a hub id 'org/name' resolved from the "
        f"local hub cache. Empty = ${BASE_MODEL_ENV} (the deployment's default, same values), else 'embedded'.",
    )
    resolution: int | None = Field(
        default=None, description="Training resolution; default: 64 for the embedded models, else the model "
        "family's (SD 1.x 512, SD 2.x 768 for v-prediction models else 512, SDXL 1024).",
    )
    single_file_config: str | None = Field(
        default=None, description="For single-file checkpoints: a local diffusers folder holding the configs."
    )
    hub_cache_dir: str | None = Field(default=None, description="Hub cache for hub ids; None = HF's default.")

    def source_setting(self) -> str:
        """The source in effect: the configured one, else the environment's, else the embedded SD model. Read
        when resolved, so a deployment's variable applies to every run without editing definitions."""
        import os

        return self.source or os.environ.get(BASE_MODEL_ENV) or EMBEDDED

    def resolve(self, artifact_root: Path, spec: Any = None) -> BaseModelRef:
        """The base model of ``spec``'s concept: its concept.toml ``[base_model]`` source when it names one (the
        family's resolution then, unless ``[latents] resolution`` says otherwise), else this deployment's."""
        if spec is not None and (section := spec.section("base_model")).get("source"):
            return resolve_base_model(section["source"], artifact_root, None, section.get("single_file_config"),
                                      self.hub_cache_dir)
        return resolve_base_model(self.source_setting(), artifact_root, self.resolution, self.single_file_config,
                                  self.hub_cache_dir)


class AcceleratorResource(dg.ConfigurableResource):
    """Device and precision for model work: CUDA when present, else CPU; bf16 where the GPU supports it."""

    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    mixed_precision: str = Field(default="auto", description="'auto', 'no', 'fp16' or 'bf16'.")

    def teardown_after_execution(self, context) -> None:
        """After every step that used a model: the GPU memory its models held goes back to the driver. torch's
        caching allocator would otherwise keep the freed blocks for this process, which matters when the next
        step runs in the same process (the in-process executor) and launches a trainer that needs them."""
        import sys

        if "torch" not in sys.modules:  # nothing was loaded: do not import torch just to find that out
            return
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def torch_device(self) -> str:
        from assets_pipeline.models.load import resolve_device

        return resolve_device(self.device)

    def precision(self) -> str:
        import torch

        if self.mixed_precision != "auto":
            return self.mixed_precision
        if self.torch_device().startswith("cuda") and torch.cuda.is_bf16_supported():
            return "bf16"
        return "no"


class CaptionerResource(dg.ConfigurableResource):
    """A BLIP captioning model from a local folder (e.g. blip-image-captioning-base saved with save_pretrained).
    Unset: photos without a sidecar caption get the template caption."""

    model_path: str | None = Field(default=None, description="Local BLIP folder; None = no model captions.")

    def load(self, artifact_root: Path, device: str, max_new_tokens: int = 30):
        if not self.model_path:
            return None
        from assets_pipeline.models.resolve import cached_fingerprint
        from assets_pipeline.stages.captions import BlipCaptioner

        fp = cached_fingerprint(Path(self.model_path), artifact_root / "base_models" / ".fingerprints")
        return BlipCaptioner(self.model_path, fp, device=device, max_new_tokens=max_new_tokens)


class ClipScorerResource(dg.ConfigurableResource):
    """The open_clip model that scores photo-caption agreement."""

    model_name: str = Field(
        default=EMBEDDED,
        description="'embedded' (tiny random CLIP), an open_clip name such as 'ViT-B-32' with `pretrained`, "
        "or 'local-dir:/path' (open_clip_config.json + weights).",
    )
    pretrained: str | None = Field(default=None, description="Local checkpoint file for a named architecture.")

    def load(self, artifact_root: Path, device: str):
        from assets_pipeline.stages.scoring import load_clip_scorer

        return load_clip_scorer(self.model_name, self.pretrained, artifact_root, device)

    def settings(self) -> dict[str, Any]:
        """What a training job records to load this scorer in the trainer (validation's CLIP-T and CLIP-I)."""
        return {"model_name": self.model_name, "pretrained": self.pretrained}


TRACKERS = ("", "tensorboard")  # accelerate's trackers that work offline and are tested here
TRAINER_MODES = ("subprocess", "k8s")


class TrainerLauncher(dg.ConfigurableResource):
    """Runs the trainer as its own process through Dagster Pipes, so GPU memory is returned after every
    training: ``python -m assets_pipeline.training`` for one process, ``accelerate launch`` for several GPUs.
    The same job file runs on Kubernetes through dagster-k8s's PipesK8sClient."""

    num_processes: int = Field(default=1, description="Processes (GPUs) for data-parallel training. A concept "
                               "that sets no batch trains one they can split (1 x N gradient accumulation steps).")
    accelerate_config_file: str | None = Field(default=None, description="`accelerate config` file to use.")
    device: str = Field(default="auto", description="'auto' (CUDA if present), 'cpu' or 'cuda'.")
    mixed_precision: str = Field(default="auto", description="'auto' (bf16 where supported), 'no', 'fp16', 'bf16'.")
    performance: PerformanceConfig = Field(
        default_factory=PerformanceConfig,
        description="Speed settings, none of which changes what is learned (each key's help says what it does). "
        "Unset keys keep their defaults, 'auto': fast on CUDA, plain on CPU (assets_pipeline/training/runtime/).",
    )

    log_with: str = Field(
        default="",
        description="Experiment tracking through accelerate's trackers: '' (none) or 'tensorboard' (the "
        "tensorboard package; logs go to the checkpoint folder while training, for `tensorboard --logdir`, and "
        "into the output's tensorboard/ folder at the end). Not part of the job identity.",
    )
    pack_size: int = Field(
        default=16,
        description="Concepts per pack: when several concepts' LoRAs (or textual-inversion tokens) on one base model "
        "are due (the retraining schedule), up to this many train in one trainer process over one frozen base, "
        "one run per pack, each concept to the result it reaches alone (README, 'Many concepts, one GPU'). "
        "1 turns packing off: one run per concept. With num_processes > 1 every concept trains alone.",
    )
    mode: str = Field(
        default="subprocess",
        description="'subprocess': the trainer runs on this machine; 'k8s': as a Kubernetes pod (settings in "
        "`k8s`; README, 'On Kubernetes').",
    )
    k8s: K8sTrainerConfig = Field(default_factory=K8sTrainerConfig, description="The pod, for mode 'k8s'.")

    def setup_for_execution(self, context) -> None:
        self.check_mode()  # a bad mode or pod setting fails the run at its start, not after the inputs are read
        if self.mode == "subprocess":  # the environment trainers get; a single local one may be started ahead
            from assets_pipeline.resources.spare_trainer import allow

            allow(spares=self.num_processes == 1)

    def teardown_after_execution(self, context) -> None:
        from assets_pipeline.resources.spare_trainer import discard

        discard()  # one started ahead that no training took

    def check_mode(self) -> None:
        from assets_pipeline.resources.k8s import check_config, gpus_for

        if self.mode not in TRAINER_MODES:
            raise ValueError(f"trainer resource: mode = {self.mode!r}; expected one of {list(TRAINER_MODES)}")
        if self.mode == "k8s":
            check_config(self.k8s, gpus_for(self.k8s, self.num_processes, self.device), self.num_processes)

    def tracker(self) -> str:
        if self.log_with not in TRACKERS:
            raise ValueError(f"trainer resource: log_with = {self.log_with!r}; expected one of {sorted(TRACKERS)}")
        if self.log_with == "tensorboard":
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ValueError("trainer resource: log_with = 'tensorboard' needs the tensorboard package "
                                 "(pip install 'assets-pipeline[tracking]')")
        return self.log_with

    def performance_settings(self) -> Performance:
        """The settings, validated here (a bad value fails the asset before a trainer process starts)."""
        return Performance.from_dict(self.performance.model_dump())

    def launch_settings(self):
        """What this resource adds to a training job (training/plan.py's ``Launch``)."""
        from assets_pipeline.training.plan import Launch

        return Launch(device=self.device, mixed_precision=self.mixed_precision,
                      performance=self.performance_settings(), log_with=self.tracker(),
                      num_processes=self.num_processes)

    def command(self, job_path: Path) -> list[str]:
        import sys

        from assets_pipeline.training import TRAINER

        if self.num_processes > 1:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(self.num_processes)]
            if self.accelerate_config_file:  # the file says how (DDP, FSDP, DeepSpeed, machines, port)
                cmd += ["--config_file", self.accelerate_config_file]
            else:
                # Without a config file, plain `accelerate launch` starts ONE process unless it sees several
                # GPUs; --multi_gpu always starts N (torchrun), and on the CPU the trainer's Accelerator(cpu=True)
                # joins them over gloo. Port 0: a free port, so concurrent trainings do not collide on 29500.
                # Precision and dynamo are the trainer's own settings (its Accelerator arguments); these only
                # silence the launcher's "values were not passed" warning.
                cmd += ["--multi_gpu", "--num_machines", "1", "--main_process_port", "0",
                        "--mixed_precision", "no", "--dynamo_backend", "no"]
            return [*cmd, "-m", "assets_pipeline.training", "--job", str(job_path)]
        return [*TRAINER, "--job", str(job_path)]

    def packing(self) -> int:
        """The pack size in effect: ``pack_size``, or 1 where a pack cannot train (several processes)."""
        if self.pack_size < 1:
            raise ValueError(f"trainer resource: pack_size = {self.pack_size!r}; expected 1 (no packing) or more")
        return 1 if self.num_processes > 1 else self.pack_size

    def pack_command(self, job_paths: list[Path]) -> list[str]:
        """:meth:`command` for several jobs (``--pack``): trained as packs of up to :meth:`packing` concepts."""
        return [*self.command(job_paths[0])[:-2], "--pack", *map(str, job_paths), "--pack-size", str(self.packing())]

    def launch_pack(self, context, job_paths: list[Path], cache_dir: str = ""):
        """Run one trainer process on several job files (a pack run, assets/packs.py). Its concepts succeed or fail
        each on its own, so a trainer that exits non-zero does not raise: the invocation's custom messages hold
        each concept's outcome, ``returncode`` its exit code (k8s: a failed pod raises)."""
        from assets_pipeline.training import TRAINER_ENV

        if self.num_processes > 1:
            from assets_pipeline.training.job import TrainJob
            from assets_pipeline.training.step import per_process_batch

            for path in job_paths:
                cfg = TrainJob.load(path).config
                per_process_batch(cfg.train_batch_size, cfg.gradient_accumulation_steps, self.num_processes)
        self.check_mode()
        if self.mode == "k8s":
            from assets_pipeline.resources.k8s import gpus_for, run_pod

            command = [self.k8s.python, *self.pack_command(job_paths)[1:]]
            return run_pod(context, self.k8s, command, dict(TRAINER_ENV),
                           gpus_for(self.k8s, self.num_processes, self.device), job_paths)
        from assets_pipeline.resources.pipes import WholeLineTempFileMessageReader
        from assets_pipeline.resources.run_watch import trainer_dies_with_run
        from assets_pipeline.resources.spare_trainer import run_trainer

        with trainer_dies_with_run(context):
            return run_trainer(context, self.pack_command(job_paths), dict(TRAINER_ENV),
                               WholeLineTempFileMessageReader(), cache_dir, check=False)

    def launch(self, context, job_path: Path, cache_dir: str = ""):
        """Run the trainer on the job file; ``cache_dir``: the job's, where the compilers keep their caches."""
        if self.num_processes > 1:  # an effective batch that cannot be split fails here, before GPUs are claimed
            from assets_pipeline.training.job import TrainJob
            from assets_pipeline.training.step import per_process_batch

            cfg = TrainJob.load(job_path).config
            per_process_batch(cfg.train_batch_size, cfg.gradient_accumulation_steps, self.num_processes)

        # Extra variables only: run_trainer merges them over this process's environment (a pod gets
        # them with k8s.env and the Pipes variables over the image's).
        from assets_pipeline.training import TRAINER_ENV

        env = dict(TRAINER_ENV)
        self.check_mode()
        if self.mode == "k8s":
            from assets_pipeline.resources.k8s import gpus_for, run_pod

            # The same command with the image's interpreter in place of this process's (command()'s first item).
            command = [self.k8s.python, *self.command(job_path)[1:]]
            return run_pod(context, self.k8s, command, env, gpus_for(self.k8s, self.num_processes, self.device),
                           job_path)
        from assets_pipeline.resources.pipes import WholeLineTempFileMessageReader
        from assets_pipeline.resources.run_watch import trainer_dies_with_run
        from assets_pipeline.resources.spare_trainer import run_trainer

        with trainer_dies_with_run(context):  # a run that ends (its worker killed) takes its trainer with it
            # PipesSubprocessClient.run, except that a trainer started ahead of the job takes it where it can
            return run_trainer(context, self.command(job_path), env, WholeLineTempFileMessageReader(), cache_dir)
