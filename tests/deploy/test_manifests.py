"""The container and cluster files parse and name only files, ports and images that exist.

Docker does not run on this machine, so nothing here builds or starts a container; the
tests check what can be checked: YAML/Dockerfile structure, that every file a volume or
COPY names is in the repository, that the ports are the ones `lockstep serve` listens on,
and that every image is pinned to a version."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent
GRPC_PORT, METRICS_PORT, HTTP_PORT = 50051, 9464, 8000
PINNED = re.compile(r"^[\w./-]+:(?!latest$)[\w.-]+$")


def test_dockerfile_copies_existing_paths_and_serves_the_ports():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert PINNED.match(base), base
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    assert re.search(rf"^EXPOSE {GRPC_PORT} {METRICS_PORT}$", text, re.M)
    assert re.search(r"^RUN apt-get update && apt-get install .*\bg\+\+", text, re.M)  # compiled steps' compiler
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1)
    assert '"lockstep", "serve"' in entry and f'"{GRPC_PORT}"' in entry and f'"{METRICS_PORT}"' in entry


def test_compose_names_existing_files_pinned_images_and_the_servers_ports():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"lockstep", "prometheus", "grafana"}
    build = services["lockstep"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    published = {p.split(":")[-1] for p in services["lockstep"]["ports"]}
    assert {str(GRPC_PORT), str(METRICS_PORT), "9090", "3000"} <= published
    for name, service in services.items():
        assert PINNED.match(service["image"]), (name, service["image"])
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), (name, source)
    prometheus_cmd = " ".join(services["prometheus"]["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus_cmd
    # The shipped scrape config targets the metrics port the server container listens on.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert any(t.endswith(f":{METRICS_PORT}") for t in targets)
    # The replicas are found through the same port's /targets.
    sd = [c["url"] for job in scrape["scrape_configs"] for c in job.get("http_sd_configs", [])]
    assert sd == [f"http://127.0.0.1:{METRICS_PORT}/targets"]


def test_kuberay_cluster_has_a_gpu_worker_group_and_serves_the_ports():
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text()))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in head["ports"]}
    assert {6379, GRPC_PORT, METRICS_PORT} <= ports
    command = " ".join(head["args"]).split()
    assert "lockstep serve" in " ".join(command) and "--ray-address" in command
    (gpu,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    # One replica per one-GPU worker: the placement group's bundles need that many.
    replicas = int(command[command.index("--replicas") + 1])
    assert command[command.index("--pool") + 1] == "h100:1" and 1 < replicas <= gpu["replicas"]
    assert HTTP_PORT in ports and command[command.index("--http-port") + 1] == str(HTTP_PORT)
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and gpu["rayStartParams"]["num-gpus"] == "1"
    for container in (head, worker):
        assert PINNED.match(container["image"]), container["image"]
    service = next(d for d in docs if d["kind"] == "Service")
    assert {p["port"] for p in service["spec"]["ports"]} == {GRPC_PORT, METRICS_PORT, HTTP_PORT}


def test_grafana_provisioning_points_at_the_shipped_dashboard():
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "lockstep.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    assert (DEPLOY / mounts[path] / "lockstep.json").is_file()
