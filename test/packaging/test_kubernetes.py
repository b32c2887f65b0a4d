"""packaging/kubernetes and packaging/helm/taser: the objects that deploy the broker.

There is no cluster here, so the objects are checked offline:
  - every plain manifest parses with PyYAML, and `kubectl kustomize` (when kubectl is
    installed) builds the kustomization;
  - the Helm chart is rendered by test/packaging/helm_render, a small Go program on the same
    template engine as Helm (text/template with Sprig v3). It is built from Debian's golang-go,
    golang-github-masterminds-sprig-dev and golang-k8s-sigs-yaml-dev. Without them the
    rendering tests are skipped, and only the template lint below runs;
  - the same checks run on both: required fields per kind, the container's securityContext,
    probes on the admin port, ports 8443/8444/9090, Service, PodDisruptionBudget and
    NetworkPolicy selectors that match the pod labels.
The API server's own schema validation is not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PACKAGING_DIR, REPO_ROOT

KUBERNETES_DIR = PACKAGING_DIR / "kubernetes"
CHART_DIR = PACKAGING_DIR / "helm" / "taser"
RENDERER_SOURCE = REPO_ROOT / "test" / "packaging" / "helm_render" / "main.go"
TOOLS_DIR = REPO_ROOT / "build" / "packaging-tools"
DEBIAN_GOPATH = Path("/usr/share/gocode")

CLIENT_PORT = 8443
BRIDGE_PORT = 8444
ADMIN_PORT = 9090


# ---------------------------------------------------------------------------------------------
# Checks shared by the plain manifests and the rendered chart


def by_kind(documents: list[dict], kind: str) -> list[dict]:
    return [d for d in documents if d["kind"] == kind]


def only(documents: list[dict], kind: str) -> dict:
    matches = by_kind(documents, kind)
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def env_map(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_required_fields(documents: list[dict]) -> None:
    for document in documents:
        assert document.get("apiVersion"), document
        assert document.get("kind"), document
        assert document.get("metadata", {}).get("name"), document


def check_deployment(documents: list[dict]) -> None:
    deployment = only(documents, "Deployment")
    spec = deployment["spec"]
    assert selects(spec["selector"]["matchLabels"], pod_labels(deployment))

    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False

    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]

    requests = container["resources"]["requests"]
    assert "cpu" in requests
    assert "memory" in requests

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": CLIENT_PORT, "bridge": BRIDGE_PORT, "admin": ADMIN_PORT}

    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}

    env = env_map(container)
    assert env["TASER_ADMIN_LISTEN"]["value"] == f"0.0.0.0:{ADMIN_PORT}"
    assert env["TASER_LISTEN"]["value"] == f"0.0.0.0:{CLIENT_PORT}"
    assert env["TASER_BRIDGE_LISTEN"]["value"] == f"0.0.0.0:{BRIDGE_PORT}"
    assert env["TASER_REPLICAS"]["value"] == str(spec["replicas"])
    assert env["TASER_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["args"][0] == "broker"

    # Every certificate path is inside a mounted Secret volume, mounted read-only, mode 0440.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes)
    for name, volume in volumes.items():
        assert volume["secret"]["defaultMode"] == 0o440, name
        assert mounts[name]["readOnly"] is True, name
    mount_paths = [m["mountPath"] for m in mounts.values()]
    for variable in ("TASER_TLS_CERT", "TASER_TLS_KEY", "TASER_CLIENT_CA", "TASER_BRIDGE_CERT",
                     "TASER_BRIDGE_KEY", "TASER_BRIDGE_CA"):
        if variable in env:
            path = env[variable]["value"]
            assert any(path.startswith(p + "/") for p in mount_paths), f"{variable}={path}"

    grace = pod["terminationGracePeriodSeconds"]
    drain = env["TASER_DRAIN_TIMEOUT"]["value"]
    assert drain.endswith("s")
    assert grace > int(drain[:-1])


def check_services(documents: list[dict]) -> None:
    labels = pod_labels(only(documents, "Deployment"))
    services = by_kind(documents, "Service")
    assert len(services) == 2
    ports = {}
    for service in services:
        assert selects(service["spec"]["selector"], labels), service["metadata"]["name"]
        (port,) = service["spec"]["ports"]
        ports[port["port"]] = (service, port)

    client_service, client_port = ports[CLIENT_PORT]
    assert client_service["spec"]["type"] == "ClusterIP"
    assert client_port["targetPort"] == "client"

    bridge_service, bridge_port = ports[BRIDGE_PORT]
    assert bridge_service["spec"]["type"] == "LoadBalancer"
    assert bridge_port["targetPort"] == "bridge"
    # A broker is ready only with a bridge, so bridges must reach brokers that are not ready.
    assert bridge_service["spec"]["publishNotReadyAddresses"] is True


def check_disruption_budget(documents: list[dict]) -> None:
    deployment = only(documents, "Deployment")
    budget = only(documents, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert "maxUnavailable" in budget["spec"] or "minAvailable" in budget["spec"]


def check_network_policy(documents: list[dict]) -> None:
    deployment = only(documents, "Deployment")
    policy = only(documents, "NetworkPolicy")
    spec = policy["spec"]
    assert selects(spec["podSelector"]["matchLabels"], pod_labels(deployment))
    assert "Ingress" in spec["policyTypes"]
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    allowed = {port["port"] for rule in spec["ingress"] for port in rule["ports"]}
    assert allowed == {"client", "bridge", "admin"}
    assert allowed <= container_ports
    if "Egress" in spec["policyTypes"]:
        assert spec["egress"] == []


def check_all(documents: list[dict]) -> None:
    check_required_fields(documents)
    check_deployment(documents)
    check_services(documents)
    check_disruption_budget(documents)
    check_network_policy(documents)


# ---------------------------------------------------------------------------------------------
# Plain manifests


def load_plain_manifests() -> list[dict]:
    kustomization = yaml.safe_load((KUBERNETES_DIR / "kustomization.yaml").read_text())
    documents = []
    for resource in kustomization["resources"]:
        documents += [d for d in yaml.safe_load_all((KUBERNETES_DIR / resource).read_text()) if d]
    return documents


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBERNETES_DIR / "kustomization.yaml").read_text())
    on_disk = {p.name for p in KUBERNETES_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


def test_plain_manifests_checks():
    check_all(load_plain_manifests())


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_build_checks():
    output = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES_DIR)],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    documents = [d for d in yaml.safe_load_all(output) if d]
    check_all(documents)
    assert {d["metadata"]["namespace"] for d in documents} == {"vault"}


# ---------------------------------------------------------------------------------------------
# Helm chart: lint that needs no renderer


def chart_templates() -> list[Path]:
    return sorted((CHART_DIR / "templates").iterdir())


def value_path_exists(values: dict, path: list[str]) -> bool:
    node = values
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


@pytest.mark.parametrize("template", chart_templates(), ids=lambda p: p.name)
def test_template_actions_balanced(template):
    text = template.read_text()
    assert text.count("{{") == text.count("}}")


@pytest.mark.parametrize("template", chart_templates(), ids=lambda p: p.name)
def test_template_value_paths_exist(template):
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for match in re.finditer(r"\.Values((?:\.[A-Za-z0-9_]+)+)", template.read_text()):
        path = match.group(1).lstrip(".").split(".")
        assert value_path_exists(values, path), f".Values.{'.'.join(path)} not in values.yaml"


def test_chart_metadata():
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "taser"
    assert chart["version"]
    assert chart["appVersion"]


# ---------------------------------------------------------------------------------------------
# Helm chart: rendered


def renderer_available() -> bool:
    return shutil.which("go") is not None and (
        DEBIAN_GOPATH / "src/github.com/Masterminds/sprig/functions.go"
    ).exists() and (DEBIAN_GOPATH / "src/sigs.k8s.io/yaml/yaml.go").exists()


needs_renderer = pytest.mark.skipif(
    not renderer_available(),
    reason="no Go renderer: install golang-go golang-github-masterminds-sprig-dev "
    "golang-k8s-sigs-yaml-dev",
)


@pytest.fixture(scope="session")
def renderer() -> Path:
    """Build test/packaging/helm_render once, into build/packaging-tools."""
    binary = TOOLS_DIR / "helm_render"
    if binary.exists() and binary.stat().st_mtime >= RENDERER_SOURCE.stat().st_mtime:
        return binary
    # Debian installs Go libraries in GOPATH layout without the /v3 major-version directory
    # that sprig's import path names, so a second GOPATH entry adds it as symbolic links.
    gopath = TOOLS_DIR / "gopath"
    for module in ("sprig", "semver"):
        link = gopath / "src/github.com/Masterminds" / module / "v3"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(DEBIAN_GOPATH / "src/github.com/Masterminds" / module)
    environment = dict(
        os.environ, GO111MODULE="off", GOPATH=f"{gopath}:{DEBIAN_GOPATH}", GOFLAGS="",
        GOCACHE=str(TOOLS_DIR / "go-cache"),
    )
    # GOPATH mode takes a package directory only as a relative path.
    result = subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        capture_output=True, text=True, env=environment, timeout=300, cwd=RENDERER_SOURCE.parent,
    )
    assert result.returncode == 0, f"go build of {RENDERER_SOURCE.parent} failed:\n{result.stderr}"
    return binary


def render(renderer: Path, tmp_path: Path, values: dict | None = None) -> subprocess.CompletedProcess:
    args = [str(renderer), str(CHART_DIR), "taser", "vault"]
    if values is not None:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args.append(str(values_file))
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def rendered_documents(renderer: Path, tmp_path: Path, values: dict | None = None) -> list[dict]:
    result = render(renderer, tmp_path, values)
    assert result.returncode == 0, result.stderr
    manifests = result.stdout.split("\n# Notes\n", 1)[0]
    return [d for d in yaml.safe_load_all(manifests) if d]


@needs_renderer
def test_helm_default_values(renderer, tmp_path):
    documents = rendered_documents(renderer, tmp_path)
    check_all(documents)
    assert by_kind(documents, "Certificate") == []


@needs_renderer
def test_helm_matches_plain_manifests(renderer, tmp_path):
    rendered = rendered_documents(renderer, tmp_path)
    plain = load_plain_manifests()
    assert sorted(d["kind"] for d in rendered) == sorted(d["kind"] for d in plain)

    def container(documents):
        return only(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]

    assert container(rendered)["env"] == container(plain)["env"]
    assert container(rendered)["ports"] == container(plain)["ports"]
    assert container(rendered)["securityContext"] == container(plain)["securityContext"]


@needs_renderer
def test_helm_replicas_flag(renderer, tmp_path):
    documents = rendered_documents(renderer, tmp_path, {"replicaCount": 3})
    deployment = only(documents, "Deployment")
    env = env_map(deployment["spec"]["template"]["spec"]["containers"][0])
    assert deployment["spec"]["replicas"] == 3
    assert env["TASER_REPLICAS"]["value"] == "3"


@needs_renderer
def test_helm_cert_manager(renderer, tmp_path):
    values = {
        "broker": {"externalHost": "vault-tunnel.example.com"},
        "tls": {
            "certManager": {
                "enabled": True,
                "clientIssuerRef": {"name": "cluster-ca"},
                "bridgeIssuerRef": {"name": "tunnel-ca"},
            }
        },
    }
    documents = rendered_documents(renderer, tmp_path, values)
    check_all(documents)
    certificates = {c["metadata"]["name"]: c["spec"] for c in by_kind(documents, "Certificate")}
    assert set(certificates) == {"taser-client", "taser-bridge"}
    assert certificates["taser-bridge"]["dnsNames"] == ["vault-tunnel.example.com"]
    assert certificates["taser-bridge"]["issuerRef"]["name"] == "tunnel-ca"
    assert "taser.vault.svc" in certificates["taser-client"]["dnsNames"]

    volumes = only(documents, "Deployment")["spec"]["template"]["spec"]["volumes"]
    secret_names = {v["secret"]["secretName"] for v in volumes}
    assert {c["secretName"] for c in certificates.values()} == secret_names


@needs_renderer
def test_helm_cert_manager_needs_external_host(renderer, tmp_path):
    values = {"tls": {"certManager": {"enabled": True,
                                      "clientIssuerRef": {"name": "cluster-ca"},
                                      "bridgeIssuerRef": {"name": "tunnel-ca"}}}}
    result = render(renderer, tmp_path, values)
    assert result.returncode != 0
    assert "broker.externalHost is required" in result.stderr


@needs_renderer
def test_helm_bridge_sources_restrict(renderer, tmp_path):
    values = {
        "service": {"bridge": {"loadBalancerSourceRanges": ["203.0.113.10/32"]}},
        "networkPolicy": {"bridgeFromCIDRs": ["203.0.113.10/32"]},
    }
    documents = rendered_documents(renderer, tmp_path, values)
    check_all(documents)
    bridge_service = next(s for s in by_kind(documents, "Service")
                          if s["spec"]["ports"][0]["port"] == BRIDGE_PORT)
    assert bridge_service["spec"]["loadBalancerSourceRanges"] == ["203.0.113.10/32"]
    rules = only(documents, "NetworkPolicy")["spec"]["ingress"]
    bridge_rule = next(r for r in rules if r["ports"][0]["port"] == "bridge")
    assert bridge_rule["from"] == [{"ipBlock": {"cidr": "203.0.113.10/32"}}]


@needs_renderer
def test_helm_plaintext_client_port(renderer, tmp_path):
    documents = rendered_documents(renderer, tmp_path, {"broker": {"plaintext": True}})
    check_all(documents)
    container = only(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--plaintext" in container["args"]
    assert "TASER_TLS_CERT" not in env_map(container)
    assert "client-tls" not in {m["name"] for m in container["volumeMounts"]}


@needs_renderer
def test_helm_optional_ca_secrets(renderer, tmp_path):
    values = {"tls": {"clientCASecretName": "pods-ca", "bridgeCASecretName": "tunnel-ca"},
              "broker": {"bridgePins": ["sha256//" + "A" * 43 + "="],
                         "extraEnv": [{"name": "TASER_BRIDGE_WAIT", "value": "10s"}]}}
    documents = rendered_documents(renderer, tmp_path, values)
    check_all(documents)
    container = only(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = env_map(container)
    assert env["TASER_CLIENT_CA"]["value"] == "/etc/taser/client-ca/ca.crt"
    assert env["TASER_BRIDGE_CA"]["value"] == "/etc/taser/bridge-ca/ca.crt"
    assert env["TASER_BRIDGE_WAIT"]["value"] == "10s"
    assert container["args"][1:] == ["--bridge-pin", "sha256//" + "A" * 43 + "="]


@needs_renderer
def test_helm_broker_disabled(renderer, tmp_path):
    result = render(renderer, tmp_path, {"broker": {"enabled": False}})
    assert result.returncode == 0, result.stderr
    manifests, notes = result.stdout.split("# Notes\n", 1)
    assert manifests.strip() == ""
    assert notes.strip() == ""


@needs_renderer
def test_helm_notes_name_broker_address(renderer, tmp_path):
    result = render(renderer, tmp_path, {"broker": {"externalHost": "vault-tunnel.example.com"}})
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("# Notes\n", 1)[1]
    assert "TASER_BROKER_ADDRESS=vault-tunnel.example.com:8444" in notes
    assert "https://taser.vault.svc:8443" in notes


@needs_renderer
def test_helm_vault_ca_configmap(renderer, tmp_path):
    pem = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----"
    documents = rendered_documents(renderer, tmp_path,
                                   {"broker": {"clientEdge": "passthrough", "vaultCA": pem}})

    maps = [d for d in documents if d["kind"] == "ConfigMap"]
    assert len(maps) == 1
    assert maps[0]["metadata"]["name"].endswith("-vault-ca")
    assert maps[0]["data"]["ca.crt"].strip() == pem


@needs_renderer
def test_helm_no_vault_ca_configmap_by_default(renderer, tmp_path):
    documents = rendered_documents(renderer, tmp_path)

    assert [d for d in documents if d["kind"] == "ConfigMap"] == []
