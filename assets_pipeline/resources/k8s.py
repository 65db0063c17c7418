"""The trainer as a Kubernetes pod: the ``trainer`` resource's ``mode: k8s``.

The pod runs the same CLI as the subprocess mode (``python -m assets_pipeline.training --job <job.json>``)
through dagster-k8s's ``PipesK8sClient``: the Pipes context goes in as environment variables, and the trainer
writes its Pipes messages (logs, the materialization) to stderr, which the client reads back from the pod's
logs. The job file names absolute paths under the artifact root, so the pod mounts the artifact volume at that
same path; nothing is translated. :func:`pod_spec` and :func:`unmounted_paths` are plain functions (the tests
check them without a cluster); :func:`run_pod` is the one place that talks to Kubernetes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

CONTAINER = "trainer"
ARTIFACT_VOLUME = "artifacts"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


class K8sTrainerConfig(dg.Config):
    """Where and how the trainer pod runs. ``image`` and ``artifact_claim`` are required in ``mode: k8s``."""

    image: str = Field(default="", description="Image with this project installed (`pip install .` with "
                       "constraints.txt); its `python` runs the trainer. Required.")
    image_pull_policy: str = Field(default="IfNotPresent", description="'Always', 'IfNotPresent' or 'Never'.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for a private registry.")
    python: str = Field(default="python", description="The interpreter in the image that runs the trainer CLI.")
    namespace: str | None = Field(default=None, description="None = the current namespace in a cluster, else "
                                  "'default'.")
    service_account: str | None = Field(default=None, description="The pod's service account; None = default.")
    gpus: int | None = Field(default=None, description="nvidia.com/gpu limit; None = num_processes (0 when the "
                             "trainer's device is 'cpu').")
    cpu: str | None = Field(default=None, description="CPU request, e.g. '8'; None = no request.")
    memory: str | None = Field(default=None, description="Memory request (and limit), e.g. '48Gi'; None = none.")
    shm_size: str | None = Field(default=None, description="A memory-backed /dev/shm of this size, e.g. '8Gi'. "
                                 "Set it for several GPUs: NCCL needs more than a container's default 64 MiB.")
    artifact_claim: str = Field(default="", description="PersistentVolumeClaim holding the artifact root "
                                "(ReadWriteMany when Dagster mounts it too). Required.")
    artifact_mount_path: str = Field(default="", description="Where the pod mounts it: the artifact root's "
                                     "absolute path, the same as on the Dagster side. Required.")
    extra_volumes: dict[str, str] = Field(default_factory=dict, description="Mount path -> PVC claim name, "
                                          "mounted read-only at the same path: base model folders or a hub "
                                          "cache outside the artifact root.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the trainer.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector, e.g. "
                                          "{'nvidia.com/gpu.product': 'NVIDIA-H100-80GB-HBM3'}.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations, as in a pod "
                                              "spec, e.g. [{'key': 'nvidia.com/gpu', 'operator': 'Exists', "
                                              "'effect': 'NoSchedule'}].")
    load_incluster_config: bool | None = Field(default=None, description="True: Dagster runs in the cluster "
                                               "(service account token); None = detect.")
    kubeconfig_file: str | None = Field(default=None, description="kubeconfig to load; None = ~/.kube/config.")
    kube_context: str | None = Field(default=None, description="Context in the kubeconfig; None = current.")
    poll_interval_s: float = Field(default=10.0, description="Seconds between pod status polls.")


def gpus_for(config: K8sTrainerConfig, num_processes: int, device: str) -> int:
    """The pod's GPU count: as configured, else one per trainer process (none for a CPU trainer)."""
    if config.gpus is not None:
        return config.gpus
    return 0 if device == "cpu" else num_processes


def check_config(config: K8sTrainerConfig, gpus: int, num_processes: int) -> None:
    """Refuse a configuration that could only fail on the cluster, naming the field to set."""
    required = {"image": "the image with this project installed",
                "artifact_claim": "the PersistentVolumeClaim holding the artifact root",
                "artifact_mount_path": "the artifact root's absolute path (the pod mounts the claim there)"}
    for name, what in required.items():
        if not getattr(config, name):
            raise ValueError(f"trainer resource: k8s.{name} is empty; mode 'k8s' needs {what}")
    for path in (config.artifact_mount_path, *config.extra_volumes):
        if not Path(path).is_absolute():
            raise ValueError(f"trainer resource: k8s mount path {path!r} is not absolute: the job file names "
                             "absolute paths, so the pod mounts each volume at the same path as on this side")
    if config.image_pull_policy not in PULL_POLICIES:
        raise ValueError(f"trainer resource: k8s.image_pull_policy = {config.image_pull_policy!r}; expected one "
                         f"of {list(PULL_POLICIES)}")
    if gpus < 0:
        raise ValueError(f"trainer resource: k8s.gpus = {gpus}; expected 0 or more")
    if 0 < gpus < num_processes:
        raise ValueError(f"trainer resource: num_processes = {num_processes} but k8s.gpus = {gpus}: each "
                         "process trains on its own GPU")
    if config.load_incluster_config and (config.kubeconfig_file or config.kube_context):
        raise ValueError("trainer resource: k8s.load_incluster_config is set together with "
                         "k8s.kubeconfig_file / k8s.kube_context; use one or the other")


def _volume_name(i: int) -> str:
    return f"extra-{i}"


def pod_spec(config: K8sTrainerConfig, command: list[str], env: dict[str, str], gpus: int) -> dict[str, Any]:
    """The trainer pod's spec (camelCase, as in a manifest), for ``PipesK8sClient.run(base_pod_spec=...)``.

    The client appends the Pipes variables (DAGSTER_PIPES_CONTEXT, DAGSTER_PIPES_MESSAGES) to this first
    container's env; everything else about the pod is here.
    """
    resources: dict[str, dict[str, str]] = {}
    if gpus:  # extended resources are set as limits; Kubernetes makes the request equal
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(gpus)
    if config.cpu:
        resources.setdefault("requests", {})["cpu"] = config.cpu
    if config.memory:  # a memory limit above the request only invites an OOM kill later; keep them equal
        resources.setdefault("requests", {})["memory"] = config.memory
        resources.setdefault("limits", {})["memory"] = config.memory

    volumes: list[dict[str, Any]] = [
        {"name": ARTIFACT_VOLUME, "persistentVolumeClaim": {"claimName": config.artifact_claim}}]
    mounts: list[dict[str, Any]] = [{"name": ARTIFACT_VOLUME, "mountPath": config.artifact_mount_path}]
    for i, (path, claim) in enumerate(sorted(config.extra_volumes.items())):
        volumes.append({"name": _volume_name(i), "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": _volume_name(i), "mountPath": path, "readOnly": True})
    if config.shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})

    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": list(command),
        "env": [{"name": k, "value": v} for k, v in {**env, **config.env}.items()],
        "volumeMounts": mounts,
    }
    if resources:
        container["resources"] = resources
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes, "restartPolicy": "Never"}
    if config.service_account:
        spec["serviceAccountName"] = config.service_account
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        spec["tolerations"] = [dict(t) for t in config.tolerations]
    if config.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]
    return spec


def pod_meta(config: K8sTrainerConfig) -> dict[str, Any]:
    """The pod's metadata for ``base_pod_meta`` (the client sets the name and adds Dagster's own labels)."""
    return {"labels": {"app.kubernetes.io/name": "assets-pipeline", "app.kubernetes.io/component": "trainer",
                       **config.labels}}


def unmounted_paths(job, job_path: Path, mount_paths: list[str]) -> list[str]:
    """The absolute paths a trainer job (a ``TrainJob``) reads or writes that no pod volume holds (each would fail
    on the pod, some only after hours of training)."""
    paths = [str(job_path), job.latents_dir, job.output_dir, job.checkpoint_dir, job.cache_dir]
    paths += [d.latents_dir for d in job.datasets]  # the other concepts trained in (LoRA)
    paths += [job.base_model.location, job.base_model.single_file_config]  # a hub model's location is its snapshot
    paths.append(job.scorer.get("pretrained"))
    for row in job.training_images:
        paths += [row.decoded_path, row.control_path]
    roots = [Path(m) for m in mount_paths]
    return [p for p in dict.fromkeys(paths)
            if p and Path(p).is_absolute() and not any(Path(p).is_relative_to(r) for r in roots)]


def run_pod(context, config: K8sTrainerConfig, command: list[str], env: dict[str, str], gpus: int,
            job_path: Path | list[Path]):
    """Launch the trainer pod through PipesK8sClient and wait for it; returns the Pipes invocation. ``job_path``:
    the job file, or a pack's job files (each checked)."""
    from dagster_k8s import PipesK8sClient

    from assets_pipeline.training.job import TrainJob

    mounts = [config.artifact_mount_path, *config.extra_volumes]
    missing = list(dict.fromkeys(p for path in (job_path if isinstance(job_path, list) else [job_path])
                                 for p in unmounted_paths(TrainJob.load(path), path, mounts)))
    if missing:
        raise ValueError("trainer resource: the trainer pod would not see these paths of the job (mount the "
                         "artifact root at its own path with k8s.artifact_mount_path, and any other folder "
                         f"with k8s.extra_volumes): {missing}")
    client = PipesK8sClient(load_incluster_config=config.load_incluster_config,
                            kubeconfig_file=config.kubeconfig_file, kube_context=config.kube_context,
                            poll_interval=config.poll_interval_s)
    context.log.info(f"trainer pod: image {config.image}, {gpus} GPU(s), namespace "
                     f"{config.namespace or '(current)'}, artifacts {config.artifact_claim} at "
                     f"{config.artifact_mount_path}")
    return client.run(context=context, namespace=config.namespace, base_pod_meta=pod_meta(config),
                      base_pod_spec=pod_spec(config, command, env, gpus))
