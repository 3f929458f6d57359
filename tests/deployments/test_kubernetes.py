"""The Kubernetes manifests of the central side: valid for Kubernetes (kubernetes-validate's schemas, offline),
in step with their kustomization, images pinned, Secrets referenced and never inlined, and every Prefect
setting they set one that Prefect (or prefect-redis) has."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from tests.conftest import PROJECT

FOLDER = PROJECT / "deployments" / "kubernetes"
KUSTOMIZATION = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
KUBERNETES_VERSION = "1.30.0"
# the Secrets a user creates before applying (docs/fleet.md, "Scaling out")
SECRETS = {
    "birdflow-secrets": {
        "postgres-password",
        "prefect-database-url",
        "prefect-api-auth-string",
        "grafana-admin-password",
        "prometheus-remote-write-password",
        "influx-token",
        "s3-access-key",
        "s3-secret-key",
        "redis-password",
    },
    "birdflow-prometheus-web": set(),
}


def resources() -> list[dict]:
    found = []
    for name in KUSTOMIZATION["resources"]:
        found += [document for document in yaml.safe_load_all((FOLDER / name).read_text()) if document]
    return found


def containers(resource: dict) -> list[dict]:
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def test_every_manifest_is_listed_and_valid_kubernetes():
    listed = set(KUSTOMIZATION["resources"])
    assert listed == {path.name for path in FOLDER.glob("*.yaml")} - {"kustomization.yaml"}
    for resource in resources():
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    kinds = {resource["kind"] for resource in resources()}
    assert {
        "Namespace",
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "NetworkPolicy",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    } <= kinds


def test_a_broken_manifest_would_be_caught():
    [api] = [
        resource
        for resource in resources()
        if resource["metadata"]["name"] == "prefect-api" and resource["kind"] == "Deployment"
    ]
    broken = {**api, "spec": {**api["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_images_are_pinned_and_every_container_has_limits_and_probes():
    for resource in resources():
        for container in containers(resource):
            image = container["image"]
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+(\.\d+)?[\w.-]*", image), f"{image} is not pinned to a version"
            assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]
            init = container in resource["spec"]["template"]["spec"].get("initContainers", [])
            assert ("livenessProbe" in container) != init, container["name"]  # init containers run to completion
            if any(port.get("name") for port in container.get("ports", [])):
                assert "readinessProbe" in container, container["name"]


def test_secrets_are_referenced_never_inlined():
    assert not [resource for resource in resources() if resource["kind"] == "Secret"]
    for resource in resources():
        for container in containers(resource):
            for variable in container.get("env", []):
                assert "value" not in variable or not re.search(
                    r"PASSWORD|TOKEN|SECRET|AUTH_STRING", variable["name"]
                ), variable
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    assert reference["key"] in SECRETS[reference["name"]], reference
        for volume in resource.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in SECRETS
    # and the fleet guide says how to create them
    guide = (PROJECT / "docs" / "fleet.md").read_text()
    assert all(key in guide for keys in SECRETS.values() for key in keys) and "birdflow-prometheus-web" in guide


def prefect_setting_names() -> set[str]:
    """Every environment variable Prefect and prefect-redis read (field names under their prefixes, and aliases)."""
    from prefect.settings import Settings
    from prefect_redis.client import RedisMessagingSettings

    def names(model) -> set[str]:
        found, prefix = set(), model.model_config.get("env_prefix", "")
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseSettings):
                found |= names(field.annotation)
                continue
            found.add((prefix + name).upper())
            alias = field.validation_alias
            choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
            found |= {choice.upper() for choice in choices if isinstance(choice, str)}
        return found

    return names(Settings) | names(RedisMessagingSettings)


def test_every_prefect_setting_is_one_prefect_has():
    known = prefect_setting_names()
    assert "PREFECT_BOGUS_SETTING" not in known and "PREFECT_MESSAGING_BROKER" in known
    used = set()
    for resource in resources():
        if resource["kind"] == "ConfigMap":
            used |= {name for name in resource["data"] if name.startswith("PREFECT_")}
        for container in containers(resource):
            used |= {
                variable["name"] for variable in container.get("env", []) if variable["name"].startswith("PREFECT_")
            }
    assert len(used) >= 10
    assert used <= known, used - known


def test_the_kustomization_points_at_what_exists():
    names = {(resource["kind"], resource["metadata"]["name"]) for resource in resources()}
    for replica in KUSTOMIZATION["replicas"]:
        assert ("Deployment", replica["name"]) in names or ("StatefulSet", replica["name"]) in names
    stateful = {resource["metadata"]["name"] for resource in resources() if resource["kind"] == "StatefulSet"}
    assert {patch["target"]["name"] for patch in KUSTOMIZATION["patches"]} == stateful  # every volume's size, here
    generated = {generator["name"] for generator in KUSTOMIZATION["configMapGenerator"]}
    for generator in KUSTOMIZATION["configMapGenerator"]:
        assert all((FOLDER / name).is_file() for name in generator["files"]), generator
    mounted = {
        volume["configMap"]["name"]
        for resource in resources()
        for volume in resource.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", [])
        if "configMap" in volume
    }
    assert mounted <= generated, mounted - generated


def test_the_central_compose_file_runs_prefect_as_the_manifests_do():
    """What the cluster and `docker-compose.central.yml` share (retention, batching, no event feed) is the same,
    and it is what `birdflow bench --stations` measures (tools/birdflow_tools/central.py reads the ConfigMap)."""
    from birdflow_tools.central import manifest_settings

    compose = yaml.safe_load((PROJECT / "docker" / "docker-compose.central.yml").read_text())["services"]["prefect"]
    shared = {name: value for name, value in manifest_settings().items() if name in compose["environment"]}
    assert {
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE",
    } <= set(shared)
    for name, value in shared.items():
        if name != "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD":  # compose reads it from .env
            assert str(compose["environment"][name]) == value, name
    assert manifest_settings()["PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD"] == "1209600"
    assert (
        "${RUN_RETENTION_SECONDS:-1209600}"
        in compose["environment"]["PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD"]
    )


def pods() -> list[dict]:
    return [resource["spec"]["template"]["spec"] for resource in resources() if "template" in resource.get("spec", {})]


def test_no_pod_runs_as_root_nor_keeps_a_capability():
    for pod in pods():
        context = pod["securityContext"]
        assert (
            context["runAsNonRoot"]
            and context["runAsUser"] > 0
            and context["seccompProfile"]["type"] == "RuntimeDefault"
        )
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }
            assert "EXTRA_PIP_PACKAGES" not in {variable["name"] for variable in container.get("env", [])}  # needs root


def test_no_pod_reaches_the_metadata_service_and_stations_reach_only_the_offered_ports():
    import ipaddress

    policies = [resource for resource in resources() if resource["kind"] == "NetworkPolicy"]
    deny_all = [
        policy
        for policy in policies
        if policy["spec"]["podSelector"] == {}
        and not policy["spec"].get("egress")
        and policy["spec"]["policyTypes"] == ["Egress"]
    ]
    assert deny_all
    metadata = ipaddress.ip_address("169.254.169.254")
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block and metadata in ipaddress.ip_network(block["cidr"]):
                    assert any(metadata in ipaddress.ip_network(excepted) for excepted in block["except"]), policy[
                        "metadata"
                    ]["name"]
    [stations] = [policy for policy in policies if policy["metadata"]["name"] == "station-facing-from-stations"]
    offered = {port["port"] for rule in stations["spec"]["ingress"] for port in rule["ports"]}
    assert 8333 in offered and not offered & {8888, 9333, 8080, 18888, 19333}  # SeaweedFS: S3 only


def redis_container() -> dict:
    [redis] = [
        resource
        for resource in resources()
        if resource["metadata"]["name"] == "redis" and resource["kind"] == "StatefulSet"
    ]
    [container] = redis["spec"]["template"]["spec"]["containers"]
    return container


def test_redis_answers_only_with_its_password_which_is_on_no_command_line(tmp_path):
    """The manifest's own command, run with Debian's redis-server (its folders moved under tmp_path): the password
    works, no password is refused, and neither redis-server's command line nor its config folder is open to others."""
    import os
    import subprocess
    import time

    import redis

    from birdflow_tools.testbed import LOOPBACK, free_port

    container = redis_container()
    assert "args" not in container and "$(REDIS_PASSWORD)" not in " ".join(container["command"])
    port, password = free_port(), "s3cret-of-the-test"
    (tmp_path / "run").mkdir()
    (tmp_path / "data").mkdir()
    script = (
        container["command"][-1].replace("/run/redis", str(tmp_path / "run")).replace("/data", str(tmp_path / "data"))
    )
    script += f" --port {port} --bind {LOOPBACK}"
    server = subprocess.Popen(["sh", "-c", script], env={**os.environ, "REDIS_PASSWORD": password})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert redis.Redis(LOOPBACK, port, password=password, socket_timeout=2).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.2)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(LOOPBACK, port, socket_timeout=2).get("x")
        command_line = (Path("/proc") / str(server.pid) / "cmdline").read_bytes()  # exec: redis-server itself
        assert b"redis-server" in command_line and password.encode() not in command_line
        assert (tmp_path / "run" / "redis.conf").stat().st_mode & 0o077 == 0
    finally:
        server.terminate()
        server.wait(10)
    for resource in resources():
        if resource["metadata"]["name"] in ("prefect-api", "prefect-services") and resource["kind"] == "Deployment":
            [prefect] = resource["spec"]["template"]["spec"]["containers"]
            names = {variable["name"] for variable in prefect["env"]}
            assert {"PREFECT_REDIS_MESSAGING_PASSWORD", "PREFECT_SERVER_DOCKET_URL"} <= names


def test_no_secret_is_put_on_a_command_line():
    for resource in resources():
        for container in containers(resource):
            secret_variables = {variable["name"] for variable in container.get("env", []) if "valueFrom" in variable}
            words = " ".join(container.get("command", []) + container.get("args", []))
            assert not [name for name in secret_variables if f"$({name})" in words], container["name"]


def test_no_pod_installs_anything_when_it_starts():
    """Prefect's packages are in its image (docker/prefect-central.Dockerfile), pinned by hash."""
    for resource in resources():
        for container in containers(resource):
            words = container.get("command", []) + container.get("args", [])
            assert not {"pip", "pip3", "uv", "apt-get"} & set(words), container["name"]
            assert "EXTRA_PIP_PACKAGES" not in {variable["name"] for variable in container.get("env", [])}
    prefect_images = {
        container["image"]
        for resource in resources()
        if resource["metadata"]["name"].startswith("prefect-") and resource["kind"] == "Deployment"
        for container in containers(resource)
    }
    assert prefect_images == {"birdflow-prefect-central:3.9.1"}
    assert {"name": "birdflow-prefect-central", "newName": "birdflow-prefect-central", "newTag": "3.9.1"} in (
        KUSTOMIZATION["images"]
    )
    dockerfile = (PROJECT / "docker" / "prefect-central.Dockerfile").read_text()
    assert "FROM prefecthq/prefect:3.9.1-python3.11" in dockerfile and "--require-hashes" in dockerfile
    pinned = (PROJECT / "docker" / "prefect-central-requirements.txt").read_text()
    assert re.findall(r"^(prefect-redis|redis)==[\d.]+ \\\n    --hash=sha256:[0-9a-f]{64}$", pinned, re.M) == [
        "prefect-redis",
        "redis",
    ]


def test_the_prefect_api_is_served_over_tls_with_a_documented_certificate():
    [ingress] = [resource for resource in resources() if resource["kind"] == "Ingress"]
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": "prefect-api", "port": {"name": "http"}}
    [tls] = ingress["spec"]["tls"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-redirect"] == "true"
    assert f"create secret tls {tls['secretName']}" in (PROJECT / "docs" / "fleet.md").read_text()


EGRESS = {  # what each pod may reach inside the namespace (beyond DNS), and Prefect the internet's 443 and 587
    "prefect-api": {("postgres", 5432), ("redis", 6379), ("prefect-api", 4200)},
    "prefect-services": {("postgres", 5432), ("redis", 6379), ("prefect-api", 4200)},
    "grafana": {("influxdb3", 8181), ("prometheus", 9090)},
    "postgres": set(),
    "redis": set(),
    "influxdb3": set(),
    "prometheus": set(),
    "seaweedfs": set(),
}


def selected(selector: dict, name: str) -> bool:
    if selector == {}:
        return True
    if "matchLabels" in selector:
        return selector["matchLabels"].get("app.kubernetes.io/name") == name
    [expression] = selector["matchExpressions"]
    return expression["operator"] == "In" and name in expression["values"]


def test_each_pod_reaches_only_what_it_needs_inside_the_namespace():
    policies = [resource for resource in resources() if resource["kind"] == "NetworkPolicy"]
    apps = {
        resource["metadata"]["labels"]["app.kubernetes.io/name"]
        for resource in resources()
        if resource["kind"] in ("Deployment", "StatefulSet")
    }
    assert apps == set(EGRESS)
    for app, allowed in EGRESS.items():
        reached = set()
        for policy in policies:
            if not selected(policy["spec"]["podSelector"], app):
                continue
            for rule in policy["spec"].get("egress", []):
                for peer in rule.get("to", []):
                    if "namespaceSelector" in peer or "ipBlock" in peer:
                        continue  # DNS in kube-system; the internet without the private networks (test above)
                    assert "podSelector" in peer and peer["podSelector"] != {}, (policy["metadata"]["name"], peer)
                    targets = [other for other in EGRESS if selected(peer["podSelector"], other)]
                    reached |= {(target, port["port"]) for target in targets for port in rule["ports"]}
        assert reached == allowed, app


def test_the_central_compose_file_publishes_its_ports_on_loopback_unless_told():
    compose = yaml.safe_load((PROJECT / "docker" / "docker-compose.central.yml").read_text())["services"]
    published = [port for service in compose.values() for port in service.get("ports", [])]
    assert published and all(port.startswith("${CENTRAL_BIND:-127.0.0.1}:") for port in published), published
    assert "CENTRAL_BIND" in (PROJECT / "docs" / "fleet.md").read_text()


def test_the_own_history_overlay_is_the_manifests_with_one_api_process_and_the_event_feed_stored():
    """What `kubectl apply -k deployments/kubernetes/own-history` changes, each change aimed at what exists, and
    what `birdflow bench --stations N --history own` runs (tools/birdflow_tools/central.py reads the overlay)."""
    from birdflow_tools.central import manifest_settings

    overlay = yaml.safe_load((FOLDER / "own-history" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    names = {(resource["kind"], resource["metadata"]["name"]) for resource in resources()}
    assert overlay["replicas"] == [{"name": "prefect-api", "count": 1}] and ("Deployment", "prefect-api") in names
    [patch] = overlay["patches"]
    assert (patch["target"]["kind"], patch["target"]["name"]) in names
    base, own = manifest_settings(), manifest_settings(own_history=True)
    changed = {name for name in own if own[name] != base.get(name)}
    assert changed == {"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED"} and set(own) == set(base)  # replaced only
    assert (
        base["PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED"],
        own["PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED"],
    ) == ("false", "true")
