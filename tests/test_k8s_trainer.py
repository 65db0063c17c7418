"""The trainer as a Kubernetes pod (the trainer resource's mode 'k8s'), without a cluster.

The pod spec is a plain function of the config; the launch goes through the real PipesK8sClient, with only the
Kubernetes API (``kubernetes.client.CoreV1Api``) replaced by a local stand-in that runs the pod's container
command here, with the pod's environment, and serves its output as the pod's log. So the real trainer CLI
reads its Pipes context from the pod's variables and its messages come back through dagster-k8s's log reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from assets_pipeline.resources import TrainerLauncher
from assets_pipeline.resources.k8s import K8sTrainerConfig, gpus_for, pod_meta, pod_spec, unmounted_paths

ARTIFACTS = "/mnt/artifacts"
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _config(**overrides) -> K8sTrainerConfig:
    return K8sTrainerConfig(**{"image": "registry.example/assets-pipeline:1.0", "artifact_claim": "artifacts-rwx",
                               "artifact_mount_path": ARTIFACTS, **overrides})


def test_the_pod_spec_is_what_the_config_says():
    from dagster_k8s.pipes import build_pod_body

    cfg = _config(namespace="training", cpu="8", memory="48Gi", shm_size="8Gi", service_account="trainer",
                  extra_volumes={"/models": "base-models"}, env={"HF_HUB_OFFLINE": "1"},
                  node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, tolerations=[TOLERATION],
                  image_pull_secrets=["registry"], labels={"team": "vision"})
    launcher = TrainerLauncher(mode="k8s", num_processes=2, k8s=cfg)
    launcher.check_mode()
    job = Path(ARTIFACTS) / "concepts" / "corgi" / "lora_adapter" / ".job-run1.json"
    command = [cfg.python, *launcher.command(job)[1:]]
    spec = pod_spec(cfg, command, {"PYTHONUNBUFFERED": "1"}, gpus_for(cfg, 2, "auto"))

    (container,) = spec["containers"]
    assert container["image"] == "registry.example/assets-pipeline:1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["command"][0] == "python"  # the image's interpreter, not this machine's
    assert container["command"][-4:] == ["-m", "assets_pipeline.training", "--job", str(job)]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "2", "memory": "48Gi"},
                                      "requests": {"cpu": "8", "memory": "48Gi"}}
    assert container["env"] == [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    assert spec["volumes"] == [
        {"name": "artifacts", "persistentVolumeClaim": {"claimName": "artifacts-rwx"}},
        {"name": "extra-0", "persistentVolumeClaim": {"claimName": "base-models", "readOnly": True}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
    ]
    assert container["volumeMounts"] == [{"name": "artifacts", "mountPath": ARTIFACTS},
                                         {"name": "extra-0", "mountPath": "/models", "readOnly": True},
                                         {"name": "dshm", "mountPath": "/dev/shm"}]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [TOLERATION]
    assert spec["serviceAccountName"] == "trainer" and spec["imagePullSecrets"] == [{"name": "registry"}]
    assert spec["restartPolicy"] == "Never"

    # dagster-k8s turns it into the pod it creates, adding the Pipes variables to the trainer container.
    pipes_env = {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"}
    pod = build_pod_body("p", None, None, pipes_env, pod_meta(cfg), spec)
    (c,) = pod.spec.containers
    assert (c.image, c.command) == (container["image"], container["command"])
    assert [(e.name, e.value) for e in c.env] == [("PYTHONUNBUFFERED", "1"), ("HF_HUB_OFFLINE", "1"),
                                                  ("DAGSTER_PIPES_CONTEXT", "ctx"), ("DAGSTER_PIPES_MESSAGES", "msgs")]
    assert c.resources.limits["nvidia.com/gpu"] == "2"
    assert [(m.name, m.mount_path, m.read_only) for m in c.volume_mounts] == [
        ("artifacts", ARTIFACTS, None), ("extra-0", "/models", True), ("dshm", "/dev/shm", None)]
    assert pod.spec.volumes[0].persistent_volume_claim.claim_name == "artifacts-rwx"
    assert pod.spec.tolerations[0].effect == "NoSchedule" and pod.spec.service_account_name == "trainer"
    assert pod.metadata.labels["app.kubernetes.io/component"] == "trainer" and pod.metadata.labels["team"] == "vision"


def test_gpus_follow_the_trainer_unless_configured():
    assert gpus_for(_config(), 1, "auto") == 1
    assert gpus_for(_config(), 4, "cuda") == 4
    assert gpus_for(_config(), 1, "cpu") == 0
    assert gpus_for(_config(gpus=8), 4, "auto") == 8
    cpu_pod = pod_spec(_config(), ["python"], {}, gpus_for(_config(), 1, "cpu"))
    assert "resources" not in cpu_pod["containers"][0]  # no GPU asked for, none requested


@pytest.mark.parametrize("settings, field", [
    ({"mode": "kubernetes"}, "mode = 'kubernetes'"),
    ({"mode": "k8s", "k8s": {"artifact_claim": "a", "artifact_mount_path": ARTIFACTS}}, "k8s.image"),
    ({"mode": "k8s", "k8s": {"image": "i", "artifact_mount_path": ARTIFACTS}}, "k8s.artifact_claim"),
    ({"mode": "k8s", "k8s": {"image": "i", "artifact_claim": "a"}}, "k8s.artifact_mount_path"),
    ({"mode": "k8s", "k8s": {"image": "i", "artifact_claim": "a", "artifact_mount_path": "artifacts"}},
     "not absolute"),
    ({"mode": "k8s", "k8s": {"image": "i", "artifact_claim": "a", "artifact_mount_path": ARTIFACTS,
                             "image_pull_policy": "sometimes"}}, "k8s.image_pull_policy"),
    ({"mode": "k8s", "num_processes": 4, "k8s": {"image": "i", "artifact_claim": "a",
                                                 "artifact_mount_path": ARTIFACTS, "gpus": 2}}, "k8s.gpus = 2"),
    ({"mode": "k8s", "k8s": {"image": "i", "artifact_claim": "a", "artifact_mount_path": ARTIFACTS,
                             "load_incluster_config": True, "kubeconfig_file": "/k"}}, "k8s.load_incluster_config"),
])
def test_a_bad_configuration_names_its_field(settings, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        TrainerLauncher(**settings).check_mode()


def test_the_subprocess_mode_ignores_the_pod_settings():
    TrainerLauncher(mode="subprocess", k8s={"image": ""}).check_mode()


def test_paths_outside_the_mounted_volumes_are_named():
    from assets_pipeline.models.resolve import BaseModelRef
    from helpers import make_job

    job = make_job("lora", latents_dir=f"{ARTIFACTS}/concepts/c/vae_latents",
                   output_dir=f"{ARTIFACTS}/concepts/c/lora/v1",
                   checkpoint_dir=f"{ARTIFACTS}/concepts/c/lora/.checkpoints", cache_dir=f"{ARTIFACTS}/cache",
                   base_model=BaseModelRef("/home/me/sd15", "folder", "/home/me/sd15", "f" * 64, 512, "sd1", "epsilon"),
                   scorer={"pretrained": None},
                   rows=[{"image_sha256": "a", "role": "instance", "caption": "c",
                          "decoded_path": f"{ARTIFACTS}/cache/images/a.png", "control_path": "/tmp/c.png"}])
    job_path = Path(ARTIFACTS) / "concepts/c/lora/.job-r.json"
    assert unmounted_paths(job, job_path, [ARTIFACTS]) == ["/home/me/sd15", "/tmp/c.png"]
    assert unmounted_paths(job, job_path, [ARTIFACTS, "/home/me", "/tmp"]) == []
    assert f"{ARTIFACTS}/cache" in unmounted_paths(job, job_path, ["/mnt/art"])  # a name's prefix is no folder


# --- the launch, through PipesK8sClient, with the Kubernetes API stood in for ------------------------------


class _PodLog:
    """A pod log response read with ``_preload_content=False``: iterable chunks, and ``.data``."""

    def __init__(self, data: bytes):
        self.data = data

    def __iter__(self):
        return iter([self.data])

    def stream(self):
        return iter([self.data])


class LocalKubelet:
    """Stands in for ``kubernetes.client.CoreV1Api``, the one seam between dagster-k8s and a cluster.

    ``create_namespaced_pod`` records the pod body and runs its container's command to the end on this machine,
    with the pod's environment only (plus this interpreter's folder on PATH, as the image's ``python``);
    stdout and stderr together, each line prefixed by a timestamp, become the pod's log, as Kubernetes serves it
    for ``timestamps=True``. The pod is then terminated, with the command's exit code.
    """

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.created: list[tuple[str, object]] = []
        self.deleted: list[str] = []
        self.log = b""
        self.exit_code: int | None = None

    def create_namespaced_pod(self, namespace, body):
        self.created.append((namespace, body))
        (container,) = body.spec.containers
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.defpath}", "HOME": str(self.workdir),
               **{e.name: e.value for e in container.env}}
        done = subprocess.run(container.command, env=env, cwd=self.workdir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=600)
        self.exit_code = done.returncode
        start = datetime.now(timezone.utc)
        self.log = b"".join(
            f"{(start + timedelta(microseconds=i)).strftime('%Y-%m-%dT%H:%M:%S.%fZ')} ".encode() + line
            for i, line in enumerate(done.stdout.splitlines(keepends=True)))
        return body

    def list_namespaced_pod(self, namespace, field_selector=None, **_):
        if not self.created or self.exit_code is None:
            return SimpleNamespace(items=[])
        name = self.created[-1][1].metadata.name
        terminated = SimpleNamespace(exit_code=self.exit_code, message=None)
        status = SimpleNamespace(name=self.created[-1][1].spec.containers[0].name, ready=False,
                                 state=SimpleNamespace(running=None, waiting=None, terminated=terminated))
        pod = SimpleNamespace(metadata=SimpleNamespace(name=name),
                              status=SimpleNamespace(init_container_statuses=None, container_statuses=[status]))
        return SimpleNamespace(items=[pod])

    def read_namespaced_pod_log(self, name, namespace, **_):
        return _PodLog(self.log)

    def delete_namespaced_pod(self, name, namespace, **_):
        self.deleted.append(name)


@pytest.fixture
def kubelet(monkeypatch, tmp_path) -> LocalKubelet:
    import kubernetes

    stand_in = LocalKubelet(tmp_path)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda *a, **k: stand_in)
    return stand_in


def _kubeconfig(tmp_path: Path) -> str:
    """A kubeconfig the client loads (and never connects to: the API calls go to the stand-in)."""
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "test", "user": {"token": "unused"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
    return str(path)


@dg.asset
def trained(context, trainer: TrainerLauncher, job_path: dg.ResourceParam[str]):
    """As the model assets do: launch the trainer on a job file and pass on what it reports."""
    yield from trainer.launch(context, Path(job_path)).get_results()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, built_models):
    """A four-photo LoRA concept's dataset half (photos, captions, latents; no class images), built once."""
    from assets_pipeline.assets.common import spec_from_snapshot
    from conftest import build_dataset_half
    from helpers import SPEC, encode, photo

    storage = build_dataset_half(tmp_path_factory.mktemp("k8s"), built_models, "rusty", {
        f"{n}.png": encode(photo(n, (96, 80)), "PNG") for n in ("astronaut", "chelsea", "coffee", "rocket")}, SPEC)
    return storage, spec_from_snapshot(storage, "rusty")


@pytest.mark.slow
def test_the_trainer_pod_reports_its_materialization_through_the_pod_log(dataset, kubelet, tmp_path):
    """PipesK8sClient.run with the real trainer CLI: the pod body is the configured one, the trainer finds its
    Pipes context in the pod's environment, and its messages come back from the pod log as the asset's
    materialization (data version = the weights) and as run logs."""
    from helpers import plan_for
    from assets_pipeline.resources import BaseModelResource, ClipScorerResource

    storage, spec = dataset
    artifacts = storage.artifact_path()
    trainer = TrainerLauncher(device="cpu", mode="k8s", k8s=_config(
        namespace="training", artifact_mount_path=str(artifacts), kubeconfig_file=_kubeconfig(tmp_path),
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, tolerations=[TOLERATION]))
    job = plan_for(storage, BaseModelResource().resolve(artifacts), spec, "lora", run_id="k8s-test",
                          input_versions={}, trainer=trainer, clip_scorer=ClipScorerResource(),
                          overrides={"max_train_steps": 2, "checkpointing_steps": 1000})
    job_path = Path(job.output_dir).parent / ".job-k8s-test.json"  # where the model asset writes it
    job_path.parent.mkdir(parents=True)
    job.save(job_path)

    with dg.DagsterInstance.ephemeral() as instance:
        res = dg.materialize([trained], instance=instance,
                             resources={"trainer": trainer, "job_path": str(job_path)})
        logs = [e.user_message for e in instance.all_logs(res.run_id)]
    assert kubelet.exit_code == 0, kubelet.log.decode()[-3000:]
    assert res.success

    ((namespace, pod),) = kubelet.created
    assert namespace == "training" and kubelet.deleted == [pod.metadata.name]
    (c,) = pod.spec.containers
    assert c.image == "registry.example/assets-pipeline:1.0"
    assert c.command == ["python", "-m", "assets_pipeline.training", "--job", str(job_path)]
    assert [(m.name, m.mount_path) for m in c.volume_mounts] == [("artifacts", str(artifacts))]
    assert pod.spec.volumes[0].persistent_volume_claim.claim_name == "artifacts-rwx"
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu" and c.resources is None  # a CPU trainer: no GPU
    env = {e.name: e.value for e in c.env}
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES", "HF_HUB_OFFLINE", "PYTHONUNBUFFERED"} <= env.keys()

    # The pod log: every Pipes message whole on its own line, from "opened" to "closed".
    lines = [line.partition(" ")[2] for line in kubelet.log.decode().splitlines()]
    messages = [json.loads(line) for line in lines if "__dagster_pipes_version" in line]
    methods = [m["method"] for m in messages]
    assert methods[0] == "opened" and methods[-1] == "closed" and "report_asset_materialization" in methods
    (report,) = [m["params"] for m in messages if m["method"] == "report_asset_materialization"]

    (mat,) = [e.materialization for e in res.get_asset_materialization_events()]
    weights_version = json.loads((Path(job.output_dir) / "metrics.json").read_text())["weights_version"]
    assert mat.tags["dagster/data_version"] == report["data_version"] == weights_version
    assert mat.metadata["steps"].value == 2 and mat.metadata["reused"].value is False
    assert any(m.startswith("wrote ") and job.output_dir in m for m in logs)  # pipes.log.info from the pod


def test_a_job_the_pod_could_not_read_starts_no_pod(kubelet, tmp_path):
    from assets_pipeline.models.resolve import BaseModelRef
    from helpers import make_job

    job_path = tmp_path / "artifacts" / ".job-r.json"
    job_path.parent.mkdir()
    inside = str(tmp_path / "artifacts")
    make_job("lora", latents_dir=inside, output_dir=inside, checkpoint_dir=inside, cache_dir=inside,
             base_model=BaseModelRef("/opt/models/sd15", "folder", "/opt/models/sd15", "f" * 64, 512, "sd1",
                                     "epsilon")).save(job_path)
    trainer = TrainerLauncher(mode="k8s", k8s=_config(artifact_mount_path=inside,
                                                      kubeconfig_file=_kubeconfig(tmp_path)))
    with dg.DagsterInstance.ephemeral() as instance:
        res = dg.materialize([trained], instance=instance, raise_on_error=False,
                             resources={"trainer": trainer, "job_path": str(job_path)})
    assert not res.success and kubelet.created == []
    (failure,) = [e for e in res.all_events if e.is_step_failure]
    assert "/opt/models/sd15" in failure.step_failure_data.error.cause.message


@dg.op(out={})
def packed(context, trainer: TrainerLauncher, job_paths: dg.ResourceParam[str]):
    """As a pack run does (assets/packs.py): one trainer process for several job files, each concept's outcome a
    custom message."""
    invocation = trainer.launch_pack(context, [Path(p) for p in job_paths.split(os.pathsep)])
    for message in invocation.get_custom_messages():
        context.log.info("outcome " + json.dumps({k: v for k, v in message.items() if k != "metadata"}))


@pytest.mark.slow
def test_a_pack_trains_in_one_pod_and_each_concept_reports_its_outcome_through_the_pod_log(dataset, kubelet,
                                                                                          tmp_path):
    """Issue 26 in mode 'k8s': the pod runs ``--pack`` with every job file (each one's paths checked against the
    mounts), trains the two concepts as one pack, and each concept's outcome comes back through the pod log."""
    from dataclasses import replace

    from helpers import plan_for
    from assets_pipeline.resources import BaseModelResource, ClipScorerResource

    storage, spec = dataset
    artifacts = storage.artifact_path()
    trainer = TrainerLauncher(device="cpu", mode="k8s", pack_size=4, k8s=_config(
        namespace="training", artifact_mount_path=str(artifacts), kubeconfig_file=_kubeconfig(tmp_path),
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}))
    paths = []
    for concept, seed in (("rusty", 0), ("rusty-twin", 1)):  # the same photos; another seed: another job
        job = plan_for(storage, BaseModelResource().resolve(artifacts), spec, "lora", run_id="k8s-pack",
                       input_versions={}, trainer=trainer, clip_scorer=ClipScorerResource(),
                       overrides={"max_train_steps": 2, "checkpointing_steps": 1000, "seed": seed})
        out = Path(job.output_dir)
        job = replace(job, concept=concept, output_dir=str(out.parent.parent.parent / concept / out.parent.name
                                                              / out.name))
        path = Path(job.output_dir).parent / ".job-k8s-pack.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        job.save(path)
        paths.append(path)

    @dg.job(resource_defs={"trainer": trainer, "job_paths": dg.ResourceDefinition.hardcoded_resource(
        os.pathsep.join(map(str, paths)))})
    def pack_job():
        packed()

    with dg.DagsterInstance.ephemeral() as instance:
        res = pack_job.execute_in_process(instance=instance)
        logs = [e.user_message for e in instance.all_logs(res.run_id)]
    assert kubelet.exit_code == 0, kubelet.log.decode()[-3000:]
    ((_, pod),) = kubelet.created
    (c,) = pod.spec.containers
    assert c.command == ["python", "-m", "assets_pipeline.training", "--pack", *map(str, paths), "--pack-size", "4"]
    outcomes = [json.loads(m.partition("outcome ")[2]) for m in logs if m.startswith("outcome ")]
    assert [o["concept"] for o in outcomes] == ["rusty", "rusty-twin"] and all("data_version" in o for o in outcomes)
    for o in outcomes:
        lineage = json.loads((Path(o["output_dir"]) / "lineage.json").read_text())
        assert lineage["concept"] == o["concept"] and lineage["pack"]["concepts"] == ["rusty", "rusty-twin"]
