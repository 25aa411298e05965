"""``curate build-lvd`` on a small folder (30 demo images by default), as a user runs it: a fresh process
with the demo backbone's settings, timed end to end, and where the time went (per-stage wall time from
the run manifests, and what was spent outside them: imports and start-up). Small pools are where fixed
costs (imports, Ray start-up, one Ray round trip per stage) dominate; ``--repo`` measures another
checkout the same way. An untimed run first writes the ``.pyc`` files an installed package has (``--cold``
skips it: where ``PYTHONDONTWRITEBYTECODE`` is set, every import then compiles from source).

    python -m benchmarks.small_build_lvd --n 30 --out docs/results/small_build_lvd.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import report


def _settings(repo: str) -> list[str]:
    code = "import json; from pipelines.demo.job import DEMO_SETTINGS; print(json.dumps(DEMO_SETTINGS))"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env={**os.environ, "PYTHONPATH": repo},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--n", type=int, default=30, help="images in the folder")
    parser.add_argument("--out")
    parser.add_argument("--cold", dest="warm", action="store_false",
                        help="no untimed warm-up run: imports compile from source if PYTHONDONTWRITEBYTECODE is set")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.repo)
    from pipelines.demo.pool import generate_demo_pool

    work = tempfile.mkdtemp(prefix="curate-small-lvd-")
    generate_demo_pool(os.path.join(work, "demo"), n=max(args.n, 100), seed=0, workers=1)
    folder = os.path.join(work, "folder")  # the first n files of the demo pool (a few broken among them)
    os.makedirs(folder)
    pool = os.path.join(work, "demo", "pool")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(pool) for f in fs)[: args.n]
    for path in files:
        shutil.copy2(path, os.path.join(folder, os.path.relpath(path, pool).replace(os.sep, "_")),
                     follow_symlinks=False)
    catalog = os.path.join(work, "catalog")
    cmd = [sys.executable, "-m", "pipelines.cli", "build-lvd", "--catalog", catalog, "--source", folder,
           "--target-size", str(max(1, args.n // 3)), "--set", *_settings(args.repo)]
    env = {**os.environ, "PYTHONPATH": args.repo, "CURATE_PROGRESS": "0"}
    if args.warm:  # as after `pip install` (which writes .pyc files): one untimed run compiles every import
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        warm = [*cmd[:5], os.path.join(work, "warm_catalog"), *cmd[6:]]
        subprocess.run(warm, cwd=args.repo, env=env, check=True, capture_output=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=args.repo, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    manifests = sorted(os.listdir(os.path.join(catalog, "_manifests")))
    rows = []
    for name in manifests:
        with open(os.path.join(catalog, "_manifests", name)) as f:
            m = json.load(f)
        rows.append({"stage": m["stage"], "wall_s": m["wall_seconds"], "executor": m["notes"].get("executor", "-")})
    in_stages = sum(r["wall_s"] for r in rows)
    rows.append({"stage": "outside stages (imports, start-up, printing)", "wall_s": wall - in_stages, "executor": ""})
    rows.append({"stage": "whole command", "wall_s": wall, "executor": ""})
    load = os.getloadavg()[0]
    report(f"curate build-lvd on {args.n} images, repo {args.repo} (load average {load:.1f})", rows, args.out,
           {"n_images": args.n, "wall_seconds": wall, "load_average": load, "load_average_before": load_before,
            "warm": args.warm})


if __name__ == "__main__":
    main()
