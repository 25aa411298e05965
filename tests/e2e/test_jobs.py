"""`curate` commands as Ray jobs, against a real Ray head (with its job server) started on loopback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from catalog import schemas
from catalog.shards import write_shards
from catalog.sql import query
from pipelines.cli import build_parser
from pipelines.cli.jobs import (
    JobError,
    add_jobs_command,
    list_jobs,
    logs,
    maybe_submit,
    status,
    strip_address,
    submit,
)
from pipelines.demo.job import DEMO_SETTINGS
from tests.helpers import cli_env, free_ports, kill_marked, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")  # Ray's own SDK

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@contextlib.contextmanager
def _ray_head(auth: dict[str, str]):
    """A Ray head with the dashboard and job server, every port our own, stopped by PID afterwards.

    ``auth``: the head's RAY_AUTH_* variables (with a token, readiness is checked with it).
    """
    temp_dir = tempfile.mkdtemp(prefix="curate-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = free_ports(9)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", **auth}
    env.pop("RAY_ADDRESS", None)
    env.pop("CURATE_RAY_ADDRESS", None)
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--num-cpus", "2", "--object-store-memory", "200000000",
           "--disable-usage-stats", "--temp-dir", temp_dir]
    marks = [temp_dir, f"127.0.0.1:{gcs}"]
    url = f"http://127.0.0.1:{dash}"
    headers = {"Authorization": f"Bearer {auth['RAY_AUTH_TOKEN']}"} if "RAY_AUTH_TOKEN" in auth else {}
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{url}/api/version", headers=headers),
                                            timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        kill_marked(marks)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    with _ray_head({"RAY_AUTH_MODE": "disabled"}) as url:
        yield url


@pytest.fixture()
def tiny_catalog(tmp_path) -> str:
    root = str(tmp_path / "cat")
    pool = pa.Table.from_pylist(
        [{"image_id": i, "uri": f"{i}.jpg", "bytes": 1, "width": 1, "height": 1, "format": "PNG",
          "sha256": "x", "status": "ok"} for i in range(3)],
        schema=schemas.stamp(schemas.POOL, "pool"),
    )
    write_shards(root, "pool", "u", pool)
    return root


def _jobs_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="curate")
    add_jobs_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert not maybe_submit(args, argv)  # managing jobs is never itself a job
    args.run(args)


def test_strip_address_forms():
    assert strip_address(["ingest", "src", "--address", "http://h:8265", "--catalog", "c"]) == \
        ["ingest", "src", "--catalog", "c"]
    assert strip_address(["ingest", "--address=http://h:8265", "src"]) == ["ingest", "src"]
    assert strip_address(["ingest", "--addr", "http://h:8265", "src"]) == ["ingest", "src"]
    assert strip_address(["sql", "SELECT 1", "--catalog", "c"]) == ["sql", "SELECT 1", "--catalog", "c"]


def test_only_commands_with_an_http_address_are_submitted(monkeypatch):
    monkeypatch.delenv("CURATE_RAY_ADDRESS", raising=False)
    parser = build_parser()
    assert not maybe_submit(parser.parse_args(["ingest", "src", "--catalog", "c"]), ["ingest", "src", "--catalog", "c"])
    argv = ["ingest", "src", "--catalog", "c", "--address", "ray://h:10001"]
    assert not maybe_submit(parser.parse_args(argv), argv)
    monkeypatch.setenv("CURATE_RAY_ADDRESS", "http://127.0.0.1:1")  # sql takes no --address: stays local
    assert not maybe_submit(parser.parse_args(["sql", "SELECT 1"]), ["sql", "SELECT 1"])


@pytest.mark.slow
def test_failed_job_is_reported_with_its_error(ray_head, tiny_catalog, capsys):
    with pytest.raises(JobError, match=r"FAILED: .*exit code 2.*resubmit the same command") as caught:
        submit(["sql", "SELECT * FROM no_such_table", "--catalog", tiny_catalog], ray_head)
    job_id = str(caught.value).split()[1]
    assert "no_such_table" in capsys.readouterr().out  # the driver's own error line, streamed
    info = status(job_id, ray_head)
    assert info["status"] == "FAILED" and info["exit_code"] == 2
    with pytest.raises(JobError, match="does not exist"):
        _jobs_cli(["jobs", "status", "curate-no-such-job", "--address", ray_head])


@pytest.mark.slow
def test_ray_stage_runs_on_the_cluster_and_streams_its_log(ray_head, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CURATE_RAY_ADDRESS", raising=False)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    root = str(tmp_path / "cat")
    argv = ["ingest", str(images), "--catalog", root, "--address", ray_head]
    assert maybe_submit(build_parser().parse_args(argv), argv)
    out = capsys.readouterr().out
    job_id = re.search(r"submitted job (\S+)", out).group(1)
    assert "pool: 6 files, 5 usable, 1 in errors" in out and f"job {job_id} SUCCEEDED" in out
    # what `./run.sh demo` shows too: no Ray WARNING, core-worker "E " or per-dataset INFO line
    assert [line for line in out.splitlines() if " WARNING " in line or line.startswith("E ")
            or "execution finished" in line] == []
    counts = query(root, "SELECT status, count(*) AS n FROM pool GROUP BY 1 ORDER BY 1").to_pylist()
    assert counts == [{"status": "error", "n": 1}, {"status": "ok", "n": 5}]

    info = status(job_id, ray_head)
    assert info["status"] == "SUCCEEDED" and info["exit_code"] == 0
    assert info["entrypoint"].startswith("python -m pipelines.cli ingest") and "--address" not in info["entrypoint"]
    assert "5 usable" in logs(job_id, ray_head)
    assert job_id in [j["job_id"] for j in list_jobs(ray_head)]
    _jobs_cli(["jobs", "status", job_id, "--address", ray_head])
    assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out


@pytest.mark.slow
def test_curate_train_runs_as_a_ray_job_with_two_workers(ray_head, tmp_path, monkeypatch, capsys):
    """`curate train --num-workers 2 --address http://…`: Ray Train on the test's own cluster."""
    from tests.train_helpers import TINY, make_catalog
    from training.models.checkpoints import load_backbone
    from training.train.run_state import read_metrics

    monkeypatch.delenv("CURATE_RAY_ADDRESS", raising=False)
    catalog = make_catalog(tmp_path, per_part=6)
    out = tmp_path / "run"
    argv = ["train", "--config", TINY, "--num-workers", "2", "--address", ray_head, f"data.catalog_root={catalog}",
            f"output_dir={out}", "optim.iterations=3", "checkpoint.period=3", "dist_timeout_s=60"]
    assert maybe_submit(build_parser().parse_args(argv), argv)
    assert "SUCCEEDED" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2]
    assert {p.name for p in (out / "ckpt" / "00000003").iterdir()} >= {"rank0.pt", "rank1.pt"}
    model, info = load_backbone(f"curate:{out / 'teacher_backbone.safetensors'}", None)
    assert info.config.embed_dim == 64 and not info.random_init


# The demo backbone: a random-init ViT's cls tokens are nearly identical, and clustering points that
# sit on top of each other would compare rounding noise rather than the two runs.
BUILD = ["--target-size", "30", "--set", *DEMO_SETTINGS, "embed.images_per_unit=8",
         "cluster.n_levels=2", "cluster.resampling_steps=2"]


@pytest.fixture(scope="module")
def job_pool(tmp_path_factory) -> str:
    from pipelines.demo.pool import generate_demo_pool

    out = str(tmp_path_factory.mktemp("jobpool") / "pool_root")
    generate_demo_pool(out, n=120, seed=3, workers=1)
    return os.path.join(out, "pool")


@pytest.fixture(scope="module")
def in_process_lvd(job_pool, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("lvd_local") / "cat")
    result = run_cli(["build-lvd", "--catalog", root, "--source", job_pool, *BUILD])
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def _same_tables(a: str, b: str) -> None:
    for sql in ("SELECT image_id, status, sha256 FROM pool ORDER BY 1", "SELECT * FROM clusters ORDER BY 1",
                "SELECT image_id FROM curated_lvd ORDER BY 1", "SELECT image_id, embedding FROM embeddings ORDER BY 1"):
        assert query(a, sql).to_pylist() == query(b, sql).to_pylist(), sql


@pytest.mark.slow
def test_job_killed_mid_embed_then_resubmitted_has_no_duplicate_rows(ray_head, job_pool, in_process_lvd, tmp_path,
                                                                      monkeypatch, capsys):
    from catalog.ledger import Ledger
    from pipelines.cli.jobs import stop, submit

    monkeypatch.delenv("CURATE_RAY_ADDRESS", raising=False)
    root = str(tmp_path / "cat")
    argv = ["build-lvd", "--catalog", root, "--source", job_pool, *BUILD]
    job_id = submit(argv, ray_head, wait=False)
    deadline = time.monotonic() + 300
    while len(Ledger(root, "embed").done()) < 2:
        assert time.monotonic() < deadline and status(job_id, ray_head)["status"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    assert stop(job_id, ray_head)
    while status(job_id, ray_head)["status"] not in ("STOPPED", "FAILED", "SUCCEEDED"):
        time.sleep(0.5)
    assert not Ledger(root, "embed").is_complete()  # it really died inside the embed stage
    resumed = submit(argv, ray_head, wait=True)
    assert query(root, "SELECT count(*) - count(DISTINCT image_id) FROM embeddings").column(0)[0].as_py() == 0
    _same_tables(root, in_process_lvd)  # the job, killed and resubmitted, built what the in-process run built
    capsys.readouterr()
    _jobs_cli(["jobs", "logs", resumed, "--address", ray_head])
    assert "curated/lvd: 30 images" in capsys.readouterr().out


@pytest.mark.slow
def test_a_token_cluster_serves_only_clients_with_the_token():
    """What docker/README.md tells a client to do (export RAY_AUTH_MODE and RAY_AUTH_TOKEN) is what works."""
    token = os.urandom(16).hex()
    with _ray_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) as url:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)
        base = {k: v for k, v in cli_env().items() if not k.startswith("RAY_AUTH")}
        command = [sys.executable, "-m", "pipelines.cli", "jobs", "list", "--address", url]
        anonymous = subprocess.run(command, env={**base, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                                   text=True, timeout=120)
        assert anonymous.returncode != 0, anonymous.stdout
        wrong = subprocess.run(command, env={**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token[::-1]},
                               capture_output=True, text=True, timeout=120)
        assert wrong.returncode != 0, wrong.stdout
        allowed = subprocess.run(command, env={**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
                                 capture_output=True, text=True, timeout=120)
        assert allowed.returncode == 0, allowed.stderr[-3000:]


def _shapes(folder, n: int, colour: tuple[int, int, int]) -> str:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(sum(colour))
    for i in range(n):
        image = Image.new("RGB", (40, 36), colour)
        x, y = (int(v) for v in rng.integers(0, 16, 2))
        image.paste(tuple(int(c) for c in rng.integers(0, 256, 3)), (x, y, x + 16, y + 14))
        image.save(folder / f"{i}.jpg", quality=90)
    return str(folder)


@pytest.mark.slow
def test_ablate_runs_prepare_each_arm_and_the_report_as_jobs(ray_head, tmp_path, monkeypatch):
    """`curate ablate --address http://…`: the arms' jobs are all submitted before the first one ends."""
    from tests.train_helpers import TINY

    monkeypatch.delenv("CURATE_RAY_ADDRESS", raising=False)
    reds, blues = _shapes(tmp_path / "reds", 8, (200, 30, 30)), _shapes(tmp_path / "blues", 8, (30, 30, 200))
    for label, colour in (("warm", (220, 120, 0)), ("cold", (0, 120, 220))):
        _shapes(tmp_path / "labelled" / label, 5, colour)
    root = str(tmp_path / "cat")
    argv = ["ablate", "--catalog", root, "--config", TINY, "--address", ray_head, "--set", "seeds=[0]", "steps=3",
            "demo_pool=''", f"evals.labelled={tmp_path / 'labelled'}",
            f"arms={{red: {{parts: {{reds: {{source: 'images:{reds}'}}}}}}, blue: {{parts: {{blues: {{source: 'images:{blues}'}}}}}}}}"]
    result = run_cli(argv)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    jobs = {arm: re.search(rf"arm {arm}: job (\S+) SUCCEEDED", out).group(1) for arm in ("red", "blue")}
    times = {j["job_id"]: j for j in list_jobs(ray_head)}
    assert max(times[j]["start_time"] for j in jobs.values()) < min(times[j]["end_time"] for j in jobs.values())
    entrypoints = [times[j]["entrypoint"] for j in jobs.values()]
    assert all("--address" not in e for e in entrypoints) and any("--only arm:red" in e for e in entrypoints)
    summary = json.loads((tmp_path / "cat" / "ablations" / "default" / "results.json").read_text())
    assert summary["arms"] == ["untrained", "red", "blue"] and summary["metrics"] == ["knn", "linear_probe"]
    assert {arm: m["images_seen"] for arm, m in summary["mechanics"].items()} == {"untrained": [0], "red": [12],
                                                                                  "blue": [12]}
