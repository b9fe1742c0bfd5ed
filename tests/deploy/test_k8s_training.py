"""deploy/k8s/training: the multi-node training Job (an Indexed Job running torchrun with c10d rendezvous)
is valid against the Kubernetes schemas, its kustomization builds, and its pieces agree with each other
and with `polyhead train` (the options it passes exist, the rendezvous host is pod 0 of the headless
Service, the node count is the same everywhere, the output lands on the serving volume)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from polyhead.cli import build_parser

from .deployfiles import DEPLOY, load_yaml, load_yaml_documents

TRAINING = DEPLOY / "k8s" / "training"
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]


def documents() -> list[dict[str, Any]]:
    kustomization = load_yaml(TRAINING / "kustomization.yaml")
    return [doc for name in kustomization["resources"] for doc in load_yaml_documents(TRAINING / name)]


def the(kind: str) -> dict[str, Any]:
    (doc,) = (d for d in documents() if d["kind"] == kind)
    return doc


def trainer_container() -> dict[str, Any]:
    (container,) = the("Job")["spec"]["template"]["spec"]["containers"]
    return dict(container)


def torchrun_and_train_args() -> tuple[dict[str, str], list[str]]:
    """torchrun's ``--key=value`` options, and the words after ``-m polyhead``."""
    container = trainer_container()
    assert container["command"] == ["torchrun"]
    args = container["args"]
    split = args.index("-m")
    assert args[split + 1] == "polyhead"
    options = dict(a.removeprefix("--").split("=", 1) for a in args[:split])
    return options, args[split + 2 :]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_training_manifests_are_valid(version: str) -> None:
    names = set(load_yaml(TRAINING / "kustomization.yaml")["resources"])
    assert names == {p.name for p in TRAINING.glob("*.yaml")} - {"kustomization.yaml"}
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)


def test_job_is_indexed_and_its_node_count_agrees() -> None:
    spec = the("Job")["spec"]
    torchrun, _ = torchrun_and_train_args()
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(torchrun["nnodes"])
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # the Job, not the kubelet, replaces pods
    assert int(torchrun["max-restarts"]) >= 1
    # Restarts need the workers' own TCPStore (pytorch/pytorch#135712).
    env = {e["name"]: e["value"] for e in trainer_container()["env"]}
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_rendezvous_is_pod_zero_of_the_headless_service() -> None:
    job, service = the("Job"), the("Service")
    torchrun, _ = torchrun_and_train_args()
    assert torchrun["rdzv-backend"] == "c10d"
    host, port = torchrun["rdzv-endpoint"].rsplit(":", 1)
    # An Indexed Job's pod i has hostname <job>-i; with subdomain = a headless Service it resolves as
    # <job>-i.<service>.
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    pod = job["spec"]["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in trainer_container()["ports"]}


def test_train_options_are_polyhead_train_options() -> None:
    _, words = torchrun_and_train_args()
    assert words[0] == "train"
    args = build_parser(only="train").parse_args(words)  # fails on an unknown or malformed option
    mounts = {m["name"]: m["mountPath"] for m in trainer_container()["volumeMounts"]}
    # Rank 0 writes the bundle and the run directory (checkpoints) onto the shared bundle volume, which
    # every node reads back on a restart.
    assert args.out.startswith(mounts["bundles"] + "/")
    assert args.run_dir.startswith(mounts["bundles"] + "/")
    assert args.checkpoint_interval > 0
    volumes = {v["name"]: v for v in the("Job")["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["bundles"]["persistentVolumeClaim"]["claimName"]
    (pvc,) = load_yaml_documents(DEPLOY / "k8s" / "pvc.yaml")
    assert pvc["metadata"]["name"] == claim
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_kustomize_builds_the_training_job(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed; manifests were validated one by one")
    result = subprocess.run(
        [kubectl, "kustomize", str(TRAINING)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(d["kind"] for d in docs) == ["Job", "Service"]
    for doc in docs:
        assert doc["metadata"]["namespace"] == "polyhead"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "polyhead"
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    (job,) = (d for d in docs if d["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "polyhead-trainer:0.1.0"
