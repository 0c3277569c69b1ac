"""deploy/ agrees with the CLI: the manifests' flags exist, probes hit the health service on the
gRPC port, the grace period covers the drain, ports match the image and the metrics flag."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lightllm_grpc.cli import build_parser
from lightllm_grpc.server.health import READINESS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SHUTDOWN_MARGIN_S = 5  # the shards stop and the process exits after the drain


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _serve_args(argv: list[str]):
    return build_parser().parse_args(["serve", *argv])


@pytest.fixture(scope="module")
def entrypoint() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    match = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert match
    argv = yaml.safe_load(match.group(1))
    assert argv[:2] == ["lightllm-grpc", "serve"]
    return argv[2:]


@pytest.fixture(scope="module")
def pod() -> dict:
    (deployment,) = _docs("k8s/deployment.yaml")
    assert deployment["kind"] == "Deployment"
    assert deployment["spec"]["replicas"] >= 2  # the multi-replica example
    return deployment["spec"]["template"]


def test_container_flags_exist_and_the_image_exposes_their_ports(pod, entrypoint) -> None:
    (container,) = pod["spec"]["containers"]
    args = _serve_args([*entrypoint, *container["args"]])  # argparse exits on an unknown flag
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    exposed = re.search(r"^EXPOSE (.*)$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1).split()
    assert sorted(map(int, exposed)) == sorted(ports.values())
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == args.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert not any("token" in a and "file" not in a for a in container["args"]), "no secret on a command line"


def test_probes_use_the_grpc_health_service(pod, entrypoint) -> None:
    (container,) = pod["spec"]["containers"]
    port = _serve_args([*entrypoint, *container["args"]]).port
    for probe, service in (("startupProbe", READINESS), ("readinessProbe", READINESS), ("livenessProbe", "")):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == port, probe
        assert grpc_probe.get("service", "") == service, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # SHARD_START_TIMEOUT_S


def test_grace_period_covers_pre_stop_and_drain(pod, entrypoint) -> None:
    (container,) = pod["spec"]["containers"]
    args = _serve_args([*entrypoint, *container["args"]])
    default = _serve_args([]).drain_timeout
    assert default == 30.0
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + args.drain_timeout + SHUTDOWN_MARGIN_S
    assert pod["spec"]["terminationGracePeriodSeconds"] >= needed
    assert "STOPSIGNAL SIGTERM" in (DEPLOY / "Dockerfile").read_text()


def test_services_declare_grpc(entrypoint, pod) -> None:
    (container,) = pod["spec"]["containers"]
    services = _docs("k8s/service.yaml")
    assert {s["metadata"]["name"] for s in services} == {"lightllm", "lightllm-headless"}
    names = {p["name"] for p in container["ports"]}
    for svc in services:
        assert svc["spec"]["selector"] == pod["metadata"]["labels"]
        grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["appProtocol"] == "grpc"
        assert grpc_port["targetPort"] in names
    headless = next(s for s in services if s["metadata"]["name"] == "lightllm-headless")
    assert headless["spec"]["clusterIP"] == "None"  # one DNS record per pod: client-side balancing


def test_envoy_health_checks_readiness_over_http2(entrypoint) -> None:
    (config,) = _docs("envoy/envoy.yaml")
    (cluster,) = config["static_resources"]["clusters"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == READINESS
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == _serve_args(entrypoint).port


def test_image_pins_grpc_packages_to_one_release() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    versions = dict(re.findall(r'"(grpcio(?:-[a-z-]+)?)==([0-9.]+)"', text))
    assert {"grpcio", "grpcio-health-checking", "grpcio-reflection"} <= set(versions)
    assert len(set(versions.values())) == 1, versions


def test_the_kernel_cache_is_on_a_volume(pod) -> None:
    """Warm-up's compiled kernels land where the pod mounts a volume, so a restarted container
    does not compile them again (docs/deploy.md)."""
    env = re.search(r"^ENV TRITON_CACHE_DIR=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert env, "the image sets TRITON_CACHE_DIR"
    (container,) = pod["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    holder = [n for n, path in mounts.items() if Path(env.group(1)).is_relative_to(path)]
    assert holder, f"no volume holds {env.group(1)}: {mounts}"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    writable = not any(m["name"] == holder[0] and m.get("readOnly") for m in container["volumeMounts"])
    assert writable and holder[0] in volumes
