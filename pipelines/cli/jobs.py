"""Running a ``curate`` command as a Ray job on a remote cluster, and looking after those jobs.

A job outlives the laptop that submitted it: the driver runs on the cluster, so closing the
terminal (or losing Wi-Fi) does not kill an 8-hour stage. The cluster's Python must already have
every dependency installed (the images under ``docker/``); only this repository's code travels
with the job, as Ray's ``working_dir``, so local edits run on the cluster without a rebuild.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog.errors import UserError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

REPO_ROOT = str(Path(__file__).resolve().parents[2])
# Never upload environments, history, data or weights: Ray caps a working_dir at a few hundred MB.
UPLOAD_EXCLUDES = [
    ".venv", ".git", "demo_out", "bench_out", ".whl", ".pytest_cache", "__pycache__", "*.egg-info",
    "*.parquet", "*.tar", "*.npy", "*.npz", "*.pt", "*.pth", "*.safetensors", "*.faiss", "*.zip",
]
# Inside the job the driver joins the cluster it runs on; quiet, line-oriented output for the log.
JOB_ENV = {
    "CURATE_RAY_ADDRESS": "auto",
    "CURATE_PROGRESS": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RESUME_HINT = ("resubmit the same command to resume: the stage ledger keeps every finished unit, "
               "so nothing done is redone")


class JobError(UserError, RuntimeError):
    """A job server that cannot be reached, or a job that ended FAILED or STOPPED."""


def is_job_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def job_address(address: str | None) -> str:
    """The job server URL from ``address``, ``CURATE_RAY_ADDRESS`` or ``RAY_API_SERVER_ADDRESS``."""
    for candidate in (address, os.environ.get("CURATE_RAY_ADDRESS"), os.environ.get("RAY_API_SERVER_ADDRESS")):
        if is_job_address(candidate):
            return candidate.rstrip("/")
    raise JobError("give --address http://HEAD:8265 (the Ray dashboard) or set CURATE_RAY_ADDRESS")


def _client(address: str) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise JobError(f"cannot reach the Ray job server at {address}: {e}") from e


def strip_address(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--address VALUE`` / ``--address=VALUE`` (or an abbreviation argparse took)."""
    out: list[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
            continue
        name, eq, _ = token.partition("=")
        if len(name) >= 3 and "--address".startswith(name):
            skip_value = not eq
            continue
        out.append(token)
    return out


def job_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The job's environment: our defaults, the submitter's ``CURATE_*`` settings, then ``env``.

    Secrets are not forwarded (the job's env is shown on the dashboard): give the cluster its own
    credentials, e.g. from a Kubernetes Secret.
    """
    forwarded = {k: v for k, v in os.environ.items() if k.startswith("CURATE_") and k != "CURATE_RAY_ADDRESS"}
    return {**forwarded, **JOB_ENV, **(env or {})}


def submit(argv: Sequence[str], address: str, *, working_dir: str = REPO_ROOT, env: dict[str, str] | None = None,
           num_gpus: float = 0, wait: bool = True) -> str:
    """Run ``python -m pipelines.cli ARGV`` as a Ray job; with ``wait``, stream its log to the end.

    Raises :class:`JobError` when the job ends FAILED or STOPPED.
    """
    address = job_address(address)
    args = strip_address(argv)
    client = _client(address)
    try:
        job_id = client.submit_job(
            entrypoint=" ".join(["python", "-m", "pipelines.cli", *map(shlex.quote, args)]),
            submission_id=f"curate-{args[0]}-{uuid.uuid4().hex[:8]}",
            runtime_env={"working_dir": working_dir, "excludes": UPLOAD_EXCLUDES, "env_vars": job_env(env)},
            entrypoint_num_gpus=num_gpus or None,
        )
    except RuntimeError as e:  # the server refused it, e.g. a working_dir over Ray's upload limit
        raise JobError(f"{address} did not accept the job: {e}") from e
    print(f"submitted job {job_id} to {address}", flush=True)
    if not wait:
        print(f"follow it with: curate jobs logs {job_id} --follow --address {address}", flush=True)
        return job_id
    try:
        _follow(client, job_id)
        final = _wait_terminal(client, job_id)
    except KeyboardInterrupt as e:
        raise JobError(f"stopped following; job {job_id} keeps running on the cluster "
                       f"(curate jobs stop {job_id} --address {address} to stop it)") from e
    if final != "SUCCEEDED":
        message = (client.get_job_info(job_id).message or "").splitlines()
        raise JobError(f"job {job_id} {final}: {message[0] if message else 'no message'}; {RESUME_HINT}")
    print(f"job {job_id} SUCCEEDED", flush=True)
    return job_id


def _follow(client: JobSubmissionClient, job_id: str, out: list[str] | None = None) -> None:
    """Print the job's log as it grows until the server closes the stream (the job has ended)."""
    from aiohttp import ClientError

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)
            if out is not None:
                out.append(chunk)

    try:
        asyncio.run(tail())
    except (RuntimeError, ClientError, OSError) as e:  # the log socket dropped; the job itself goes on
        print(f"\n(log stream lost: {e}; waiting for the job to end)", file=sys.stderr, flush=True)


def _wait_terminal(client: JobSubmissionClient, job_id: str) -> str:
    """The job's final status; the log stream can close a moment before the status is written."""
    while (state := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(1.0)
    return state


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first: id, status, start time and entrypoint."""
    jobs = _client(job_address(address)).list_jobs()
    rows = [{"job_id": j.submission_id or j.job_id, "status": str(j.status.value), "start_time": j.start_time,
             "end_time": j.end_time, "entrypoint": j.entrypoint, "message": j.message} for j in jobs]
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def status(job_id: str, address: str | None = None) -> dict[str, Any]:
    """A job's status, its server message and the driver's exit code."""
    info = _client(job_address(address)).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "exit_code": info.driver_exit_code, "entrypoint": info.entrypoint}


def logs(job_id: str, address: str | None = None, follow: bool = False) -> str:
    """The job's log so far; with ``follow``, printed as it grows until the job ends."""
    client = _client(job_address(address))
    if not follow:
        return client.get_job_logs(job_id)
    chunks: list[str] = []
    _follow(client, job_id, chunks)
    return "".join(chunks)


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    return bool(_client(job_address(address)).stop_job(job_id))


def maybe_submit(args: argparse.Namespace, argv: Sequence[str]) -> bool:
    """Submit the parsed command as a job when its address is a job server URL; True if it did.

    Only commands that take ``--address`` (the long, Ray-backed stages) are ever submitted.
    """
    if not hasattr(args, "address"):
        return False
    address = args.address or os.environ.get("CURATE_RAY_ADDRESS")
    if not is_job_address(address):
        return False
    submit(argv, address)
    return True


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def add_jobs_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser | None = None) -> None:
    """``curate jobs list|status|logs|stop [JOB_ID] --address URL``."""
    p = sub.add_parser("jobs", parents=[common] if common else [],
                       help="list, inspect, follow or stop curate jobs on a Ray cluster",
                       description="Any command that takes --address runs as a Ray job when the address is "
                       "the cluster's dashboard URL (http://HEAD:8265); these look after those jobs.")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    # dest differs from the stages' "address" so that maybe_submit never turns this into a job itself
    p.add_argument("--address", dest="server", default=None, help="Ray dashboard URL (default: CURATE_RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")

    def run(args: argparse.Namespace) -> None:
        try:
            _run_action(args)
        except RuntimeError as e:  # the job server's answer, e.g. an unknown job id
            raise JobError(str(e)) from e

    p.set_defaults(run=run)


def _run_action(args: argparse.Namespace) -> None:
    if args.action == "list":
        for r in list_jobs(args.server):
            print(f"{r['job_id']:<32} {r['status']:<10} {_when(r['start_time'])}  {r['entrypoint']}")
        return
    if not args.job_id:
        raise JobError(f"curate jobs {args.action} needs a JOB_ID (see curate jobs list)")
    if args.action == "status":
        s = status(args.job_id, args.server)
        print(f"{s['job_id']}: {s['status']} (exit code {s['exit_code']})\n{s['message'] or ''}".rstrip())
    elif args.action == "logs":
        text = logs(args.job_id, args.server, follow=args.follow)
        if not args.follow:
            print(text, end="")
    else:
        print(f"{args.job_id}: {'stop requested' if stop(args.job_id, args.server) else 'already ended'}")

