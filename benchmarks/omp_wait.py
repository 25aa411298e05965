"""Small hierarchical k-means under each OpenMP wait policy and thread count, each in a fresh process
(libgomp reads ``OMP_WAIT_POLICY`` when it loads). On a busy host, spinning idle threads hold cores that
the threads they wait for need; ``catalog/threads.py`` sets ``PASSIVE`` for that reason.

    python -m benchmarks.omp_wait --rows 23 --repeats 2 --out docs/results/omp_wait.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD = """
import json, sys, time
import numpy as np, torch
from curation.hierarchy import default_levels, hierarchical_kmeans
rows, threads, repeats = map(int, sys.argv[1:4])
torch.set_num_threads(threads)
x = np.random.default_rng(0).standard_normal((rows, 256)).astype(np.float32)
levels = default_levels(rows, 5, resampling_steps=10)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    hierarchical_kmeans(x, levels, seed=0)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def _run(policy: str, threads: int, rows: int, repeats: int) -> list[float]:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(rows), str(threads), str(repeats)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=23, help="rows to cluster (a small pool's embeddings)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rows = []
    for policy in ("ACTIVE", "PASSIVE"):
        for threads in (1, 2):
            times = _run(policy, threads, args.rows, args.repeats)
            rows.append({"OMP_WAIT_POLICY": policy, "threads": threads, "min_s": min(times), "max_s": max(times),
                         "load_average": os.getloadavg()[0]})
    report(f"hierarchical k-means of {args.rows} x 256 (5 levels, 10 resampling steps)", rows, args.out,
           {"rows": args.rows, "repeats": args.repeats})


if __name__ == "__main__":
    main()
