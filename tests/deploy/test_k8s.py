"""deploy/k8s: every manifest is valid against the Kubernetes schemas, the kustomizations build, and the
ports, probes and POLYHEAD_* variables agree with the server's settings (server/settings.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from polyhead.server.settings import ServerSettings

from .deployfiles import DEPLOY, load_yaml, load_yaml_documents
from .settings_env import serve_settings, settings_from_env, unknown_settings

K8S = DEPLOY / "k8s"
# Native gRPC probes are GA since 1.27 and the preStop `sleep` action since 1.30 (beta, on by default):
# the oldest version the manifests promise, and the newest the schemas know.
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
# Kinds without a built-in schema: kustomize's own files and the Prometheus Operator's CRD.
NOT_KUBERNETES = {"Kustomization", "Component", "ServiceMonitor"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml"))


def patch_files() -> set[Path]:
    """Files the components use as patches (partial objects), not as resources."""
    return {
        kfile.parent / patch["path"]
        for kfile in (K8S / "components").glob("*/kustomization.yaml")
        for patch in load_yaml(kfile).get("patches", [])
        if "path" in patch
    }


def all_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in load_yaml_documents(path)]


def resource(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        doc
        for path, doc in all_documents()
        if doc.get("kind") == kind
        and (name is None or doc["metadata"]["name"] == name)
        and "components" not in path.parts
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(matches)}"
    return matches[0]


def server_container() -> dict[str, Any]:
    containers = resource("Deployment")["spec"]["template"]["spec"]["containers"]
    (container,) = (c for c in containers if c["name"] == "server")
    return dict(container)


def container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in server_container()["ports"]}


def server_env() -> dict[str, str]:
    """The environment the server container gets: the ConfigMap, then literal and secret env entries."""
    env = dict(resource("ConfigMap", "polyhead-server")["data"])
    for entry in server_container().get("env", []):
        env[entry["name"]] = entry.get("value", f"<from {next(iter(entry.get('valueFrom', {})), '?')}>")
    return env


# --- schema validity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_against_kubernetes_schema(path: Path, version: str) -> None:
    docs = load_yaml_documents(path)
    assert docs, f"{path} holds no document"
    if path in patch_files():
        return  # a patch is a partial object; the rendered output is validated below
    for doc in docs:
        if doc["kind"] not in NOT_KUBERNETES:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_base_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists missing {name}"
    base = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # Opt-in: the ServiceMonitor needs the Prometheus Operator's CRD.
    assert listed == base - {"servicemonitor.yaml"}


def test_components_reference_existing_files() -> None:
    for kfile in (K8S / "components").glob("*/kustomization.yaml"):
        component = load_yaml(kfile)
        assert component["kind"] == "Component"
        for patch in component.get("patches", []):
            if "path" in patch:
                assert (kfile.parent / patch["path"]).is_file(), f"{kfile}: missing {patch['path']}"
        for name in component.get("resources", []):
            assert (kfile.parent / name).is_file(), f"{kfile}: missing {name}"


def kustomize(tmp_path: Path, components: list[str]) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed; manifests were validated one by one")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    # kustomize refuses absolute paths to bases and components; relative ones may leave the overlay.
    base = os.path.relpath(K8S, overlay)
    lines = [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        f"resources: [{base}]",
        f"components: [{', '.join(f'{base}/components/{c}' for c in components)}]",
    ]
    (overlay / "kustomization.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize(
    "components",
    [
        [],
        ["tls"],
        ["bundle-init-container"],
        ["tls", "bundle-init-container"],
        ["updater"],
        ["tls", "updater"],
    ],
    ids=str,
)
def test_kustomize_builds_and_the_output_is_valid(tmp_path: Path, components: list[str]) -> None:
    docs = kustomize(tmp_path, components)
    kinds = sorted(d["kind"] for d in docs)
    for doc in docs:
        assert doc["metadata"].get("namespace", "polyhead") == "polyhead" or doc["kind"] == "Namespace"
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    assert all(d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "polyhead" for d in docs)
    if "updater" in components:
        (job,) = (d for d in docs if d["kind"] == "Job")
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "polyhead-trainer:0.1.0"
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (server,) = pod["containers"]
    if "bundle-init-container" in components:
        assert "PersistentVolumeClaim" not in kinds
        assert "emptyDir" in volumes["bundles"]
        assert pod["initContainers"][0]["volumeMounts"][0]["name"] == "bundles"
    else:
        assert "PersistentVolumeClaim" in kinds
        assert volumes["bundles"]["persistentVolumeClaim"]["claimName"] == "polyhead-bundles"
    env = {e["name"]: e.get("value") for e in server.get("env", [])}
    if "tls" in components:
        assert env["POLYHEAD_TLS_CERT"].startswith("/etc/polyhead/tls/")
        # The kubelet's gRPC probes cannot speak TLS: the component swaps them for exec probes.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in server[probe]
            assert server[probe]["exec"]["command"][:2] == ["python", "/opt/polyhead/healthcheck.py"]
        mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
        assert env["POLYHEAD_TLS_CERT"].startswith(mounts["tls"])
        assert volumes["tls"]["secret"]["secretName"] == "polyhead-tls"
        # The settings accept the pair (cert and key together).
        settings_from_env({**server_env(), **{k: v for k, v in env.items() if v}})
    else:
        assert "POLYHEAD_TLS_CERT" not in env
        assert server["readinessProbe"]["grpc"]["port"] == container_ports()["grpc"]


# --- agreement with the server's settings ------------------------------------------------------------------


def test_every_polyhead_variable_is_a_server_setting() -> None:
    env = server_env()
    assert unknown_settings(env) == []
    assert all(name.startswith("POLYHEAD_") for name in resource("ConfigMap", "polyhead-server")["data"])


def pod_settings() -> ServerSettings:
    """What the server container runs with: its args resolved by `polyhead serve` under its environment."""
    return serve_settings(server_container()["args"], server_env())


def test_ports_and_probes_match_the_settings() -> None:
    settings = pod_settings()
    ports = container_ports()
    assert ports == {
        "grpc": settings.port,
        "admin": settings.admin_port,
        "metrics": settings.metrics_port,
    }
    container = server_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Native gRPC probe on grpc.health.v1, service "" (the whole server).
        assert container[probe]["grpc"] == {"port": settings.port, "service": ""}
    annotations = resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == settings.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_server_listens_where_the_cluster_can_reach_it() -> None:
    settings = pod_settings()
    assert settings.host not in LOOPBACK, "the kubelet's probes and the Service need a non-loopback bind"
    assert settings.metrics_host not in LOOPBACK
    if settings.admin_mode != "off" and settings.admin_host not in LOOPBACK:
        # An admin port open to the pod network must require the token, from a Secret, not the ConfigMap.
        assert "POLYHEAD_ADMIN_TOKEN" not in resource("ConfigMap", "polyhead-server")["data"]
        (token,) = (e for e in server_container()["env"] if e["name"] == "POLYHEAD_ADMIN_TOKEN")
        assert token["valueFrom"]["secretKeyRef"]["name"] == "polyhead-admin"
        assert not token["valueFrom"]["secretKeyRef"].get("optional", False)


def test_bundle_comes_from_the_shared_volume() -> None:
    settings = pod_settings()
    container = server_container()
    args = container["args"]
    assert args[0] == "serve"
    assert args[args.index("--bundle") + 1] == str(settings.bundle)
    (mount,) = (m for m in container["volumeMounts"] if m["name"] == "bundles")
    assert settings.bundle.is_relative_to(mount["mountPath"])
    pod = resource("Deployment")["spec"]["template"]["spec"]
    (volume,) = (v for v in pod["volumes"] if v["name"] == "bundles")
    pvc = resource("PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "replicas on several nodes share one bundle"


def test_configmap_alone_is_a_complete_configuration() -> None:
    # The ConfigMap names the bundle too, so `polyhead serve` with flags and the environment agree.
    from_env = settings_from_env(server_env(), bundle=resource("ConfigMap")["data"]["POLYHEAD_BUNDLE"])
    assert from_env == pod_settings()


def test_graceful_shutdown_fits_the_termination_grace_period() -> None:
    settings = pod_settings()
    pod = resource("Deployment")["spec"]["template"]["spec"]
    pre_stop = server_container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + settings.grace_period_s < pod["terminationGracePeriodSeconds"]


def test_services_select_the_server_pods_and_name_real_ports() -> None:
    pod_labels = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    ports = container_ports()
    for name in ("polyhead", "polyhead-headless"):
        service = resource("Service", name)
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
            assert port["port"] == ports[port["targetPort"]]
    assert resource("Service", "polyhead-headless")["spec"]["clusterIP"] == "None"
    monitor = resource("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= resource("Service", "polyhead")["metadata"]["labels"].items()
    )
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in resource("Service", "polyhead")["spec"]["ports"]
    }


def test_autoscaler_budget_and_policy_target_the_deployment() -> None:
    deployment = resource("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = resource("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert "cpu" in server_container()["resources"]["requests"], "CPU utilisation needs a CPU request"
    pdb = resource("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to proceed"
    policy = resource("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    named = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert named == set(container_ports())


# --- the online updater component -------------------------------------------------------------------------


def updater_job() -> dict[str, Any]:
    (job,) = load_yaml_documents(K8S / "components" / "updater" / "job.yaml")
    return dict(job)


def test_updater_job_arguments_parse_and_reach_the_servers() -> None:
    from polyhead.cli import _load_registrars, build_parser

    registrar = _load_registrars().get("adapt")
    assert callable(registrar), f"`polyhead adapt` does not load: {registrar}"  # a bug, never a skip
    container = updater_job()["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    # Kubernetes expands $(VAR) in args from the container's env: the token comes from the Secret.
    secret = env["POLYHEAD_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "polyhead-admin", "key": "token"}
    argv = [a.replace("$(POLYHEAD_ADMIN_TOKEN)", "secret-token") for a in container["args"]]
    args = build_parser().parse_args(argv)
    assert args.command == "adapt" and args.source == "remote" and args.admin_token == "secret-token"
    settings = pod_settings()
    headless = resource("Service", "polyhead-headless")
    ports = {p["name"]: p["port"] for p in headless["spec"]["ports"]}
    assert args.server == f"{headless['metadata']['name']}:{settings.port}" and ports["grpc"] == settings.port
    assert args.admin_target == f"{headless['metadata']['name']}:{settings.admin_port}"
    assert ports["admin"] == settings.admin_port
    assert args.bundle == str(settings.bundle)
    annotations = updater_job()["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == args.metrics_port
    assert container["ports"][0]["containerPort"] == args.metrics_port


def test_updater_may_reach_admin_and_write_the_bundle() -> None:
    pod = updater_job()["spec"]["template"]
    policy = resource("NetworkPolicy")
    (admin_rule,) = (r for r in policy["spec"]["ingress"] if "from" in r)
    assert admin_rule["from"][0]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [p["port"] for p in admin_rule["ports"]] == ["admin"]
    (volume,) = (v for v in pod["spec"]["volumes"] if v["name"] == "bundles")
    claim = resource("PersistentVolumeClaim")["metadata"]["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    assert not volume["persistentVolumeClaim"].get("readOnly", False)
    (mount,) = (m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "bundles")
    assert not mount.get("readOnly", False), "the updater publishes head versions into the bundle"
