"""The Helm chart, rendered by Helm's own engine, and the KServe manifests, checked against the Kubernetes schemas.

Rendering uses helm-python-sdk (Helm's Go SDK built as a C library; no helm
binary is packaged for pip or Debian) and validation kubernetes-validate
(the Kubernetes OpenAPI schemas, offline, strict: unknown fields fail). Both
come with the dev extra; their tests skip, saying so, where they are missing.
The KServe and prometheus-operator kinds are custom resources with no schema
there: their embedded Kubernetes objects (containers, resources, selectors)
are validated as such, and their own fields against the names in KServe's
and the operator's documentation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgescope.export.triton import REPOSITORY_DIR

from . import deploy_checks

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install helm-python-sdk)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)"
)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "edgescope"
KSERVE = ROOT / "deploy" / "kserve"
# The lowest Kubernetes the chart supports (gRPC probes GA) and the newest schema at hand.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
SECRETS = {"tls": {"existingSecret": "edgescope-tls"}, "tokens": {"existingSecret": "edgescope-tokens"}}


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="edgescope", namespace="imaging")
    documents = [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]
    assert all(doc["metadata"]["name"] for doc in documents)
    return documents


def _kind(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in documents if doc["kind"] == kind]
    return found


def _validate(document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}


def _merged(*layers: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            merged[key] = _merged(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


VARIANTS = {
    "defaults": SECRETS,
    "gpu-servicemonitor": _merged(SECRETS, {"gpu": {"count": 1}, "serviceMonitor": {"enabled": True}}),
    "bundles-image-mtls": _merged(SECRETS, {"modelRepository": {"source": "image"}, "tls": {"clientAuth": True}}),
    "mesh-plaintext": _merged(SECRETS, {"tls": {"enabled": False}}),
    "kserve-remote": _merged(yaml.safe_load((KSERVE / "edgescope-remote-values.yaml").read_text()), SECRETS),
    "chart-made-secrets": {
        "tls": {"cert": "-----BEGIN CERTIFICATE-----", "key": "-----BEGIN PRIVATE KEY-----", "ca": "CA"},
        "tokens": {"lines": ["read r-token", "admin a-token"], "metricsToken": "r-token"},
        "serviceMonitor": {"enabled": True},
    },
}


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_manifest_is_valid_kubernetes(variant: str, version: str) -> None:
    documents = _render(VARIANTS[variant])
    for document in documents:
        if document["kind"] == "ServiceMonitor":
            _check_service_monitor(document, version)
        else:
            _validate(document, version)


def _check_service_monitor(monitor: dict[str, Any], version: str) -> None:
    # monitoring.coreos.com/v1 ServiceMonitor fields, from the prometheus-operator API reference.
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    _validate(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "check"},
            "spec": {"selector": spec["selector"], "template": {"spec": {"containers": [{"name": "c"}]}}},
        },
        version,
    )
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scheme", "tlsConfig", "authorization"}
        assert endpoint["port"] == "metrics"


def test_the_deployment_runs_the_server_as_agreed() -> None:
    documents = _render(VARIANTS["gpu-servicemonitor"])
    service = _kind(documents, "Service")
    pod = _kind(documents, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["edgescope", "serve"]
    flags = {arg.split("=", 1)[0] for arg in container["args"] if arg.startswith("--")}
    assert flags <= deploy_checks.serve_flags(), flags - deploy_checks.serve_flags()
    assert {"--tls-cert", "--tls-key", "--token-file"} <= flags and "--insecure" not in flags
    assert container["args"][-1] == "/models/lesion-unet"
    # Options reach the server from the ConfigMap through $(VAR) expansion.
    options = _kind(documents, "ConfigMap")["data"]
    for arg in container["args"]:
        for variable in re.findall(r"\$\((\w+)\)", arg):
            assert variable in options or variable in {e["name"] for e in container["env"]}, variable
    assert container["envFrom"][0]["configMapRef"]["name"] == _kind(documents, "ConfigMap")["metadata"]["name"]
    # Unprivileged, read-only, and a GPU from the device plugin.
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # TLS on: the probes run the image's health check over TLS (the kubelet's gRPC probe has no TLS).
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[1] == "/opt/edgescope/healthcheck.py" and "--tls-ca" in command
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}
    assert _kind(documents, "ServiceMonitor")["spec"]["endpoints"][0]["scheme"] == "https"


def test_without_tls_the_probes_are_kubernetes_grpc_probes_and_plain_text_is_explicit() -> None:
    documents = _render(VARIANTS["mesh-plaintext"])
    (container,) = _kind(documents, "Deployment")["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": 8731}
    assert "--insecure" in container["args"]
    assert not any(arg.startswith("--tls-") for arg in container["args"])
    assert "ServiceMonitor" not in {doc["kind"] for doc in documents}


def test_bundles_come_from_a_claim_or_an_image() -> None:
    claim = _render(VARIANTS["defaults"])
    pod = _kind(claim, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes["models"]["persistentVolumeClaim"]["claimName"]
        == _kind(claim, "PersistentVolumeClaim")["metadata"]["name"]
    )
    image = _render(VARIANTS["bundles-image-mtls"])
    pod = _kind(image, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"].startswith("registry.example.org/edgescope-bundles:")
    assert "PersistentVolumeClaim" not in {doc["kind"] for doc in image}
    assert "--tls-client-ca=/run/secrets/edgescope/tls/client-ca.crt" in pod["containers"][0]["args"]


def test_secrets_are_required_not_invented() -> None:
    made = _render(VARIANTS["chart-made-secrets"])
    data = {doc["metadata"]["name"]: set(doc["data"]) for doc in made if doc["kind"] == "Secret"}
    assert data == {"edgescope-tls": {"tls.crt", "tls.key", "ca.crt"}, "edgescope-tokens": {"tokens", "metrics-token"}}
    with pytest.raises(helm.HelmError, match=r"tls.cert \(PEM\) or tls.existingSecret is required"):
        _render({"tokens": {"existingSecret": "t"}})
    with pytest.raises(helm.HelmError, match=r"tokens\.lines"):
        _render({"tls": {"existingSecret": "t"}})
    with pytest.raises(helm.HelmError, match="backend remote needs remoteUrl"):
        _render(_merged(SECRETS, {"backend": "remote"}))


def test_helm_lint_finds_no_warning() -> None:
    report = helm.lint(str(CHART), SECRETS, strict=True)
    assert not report["errors"], report
    # Severity 1 is information ("icon is recommended"); warnings and errors are above it.
    assert [m for m in report["messages"] if m["severity"] > 1] == []


def _kserve(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((KSERVE / name).read_text())
    return loaded


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_kserve_manifests_hold_valid_kubernetes_objects(version: str) -> None:
    runtime = _kserve("servingruntime.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    # ServingRuntimeSpec fields used here, from KServe's API reference.
    assert set(runtime["spec"]) <= {"supportedModelFormats", "protocolVersions", "containers", "multiModel"}
    _validate(_pod({"containers": runtime["spec"]["containers"]}), version)
    service = _kserve("inferenceservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert set(model) <= {"modelFormat", "runtime", "protocolVersion", "storageUri", "resources", "args", "env"}
    _validate(_pod({"containers": [{"name": "kserve-container", "resources": model["resources"]}]}), version)


def test_kserve_serves_the_bundles_triton_repository_that_edgescope_at_the_edge_uses() -> None:
    runtime = _kserve("servingruntime.yaml")
    service = _kserve("inferenceservice.yaml")
    edge = yaml.safe_load((KSERVE / "edgescope-remote-values.yaml").read_text())
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [
        {k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    assert "--model-store=/mnt/models" in container["args"] and container["ports"][0]["name"] == "h2c"
    # storageUri: pvc://<claim>/<bundle>/<what export --format triton writes>, on the claim the edge mounts.
    match = re.fullmatch(r"pvc://([^/]+)/([^/]+)/([^/]+)", model["storageUri"])
    assert match is not None
    claim, bundle, folder = match.groups()
    assert folder == REPOSITORY_DIR
    assert claim == edge["modelRepository"]["pvc"]["existingClaim"] and [bundle] == edge["bundles"]
    # The edge server's remote backend points at this InferenceService's predictor Service.
    assert edge["backend"] == "remote"
    assert edge["remoteUrl"].startswith(f"{service['metadata']['name']}-predictor.")
    assert set(edge["options"]) | {"backend", "remote-url"} <= {f[2:] for f in deploy_checks.serve_flags()}
