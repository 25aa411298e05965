"""How long ``curate`` takes to start, and whether a light command imports torch or Ray.

Runs each command ``--runs`` times as a fresh process (the repository given by ``--repo`` on
PYTHONPATH, so the same script measures another checkout, e.g. ``git archive`` of an older branch)
and reports the median wall time, plus whether ``python -X importtime`` shows torch or ray.

    python -m benchmarks.cli_startup --runs 7 --out docs/results/cli_startup.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import report

COMMANDS = {
    "--help": ["--help"],
    "sql --help": ["sql", "--help"],
    'sql "SELECT 1"': ["sql", "SELECT 1", "--catalog", "{catalog}"],
}


def _run(repo: str, args: list[str], importtime: bool = False) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": repo}
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "pipelines.cli", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stderr


def _heavy(stderr: str) -> list[str]:
    """Top-level packages torch / ray among the modules imported."""
    names = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    return sorted(n for n in names if n in ("torch", "ray"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    catalog = tempfile.mkdtemp(prefix="curate-empty-catalog-")
    rows = []
    for name, template in COMMANDS.items():
        cmd = [a.replace("{catalog}", catalog) for a in template]
        _run(args.repo, cmd)  # warm the page cache once
        times = [_run(args.repo, cmd)[0] for _ in range(args.runs)]
        rows.append({"command": f"curate {name}", "median_s": statistics.median(times), "min_s": min(times),
                     "imports": ", ".join(_heavy(_run(args.repo, cmd, importtime=True)[1])) or "-"})
    load = os.getloadavg()[0]
    report(f"curate start-up, {args.runs} runs each, repo {args.repo} (load average {load:.1f})", rows, args.out,
           {"load_average": load})


if __name__ == "__main__":
    main()
