"""How big the cluster stage's plan is on an embeddings table of ``--rows`` rows in shards of ``--shard-rows``:
its members listed by shard (as the stage records them) against one ``[image_id, sha256]`` pair per row
(what a per-image plan would record), and how long listing the shards takes.

    python -m benchmarks.plan_size --rows 1000000 --shard-rows 250000 --out docs/results/plan_size_1e6.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time

import numpy as np

from benchmarks.common import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shard-rows", type=int, default=250_000)
    parser.add_argument("--out")
    args = parser.parse_args()
    from catalog.embeddings import embeddings_table
    from catalog.shards import write_shards
    from pipelines.cluster_update import cluster_items

    root = tempfile.mkdtemp(prefix="plan_size_") + "/cat"
    ids = np.arange(args.rows, dtype=np.int64) * 7919 - 2**40  # spread like blake2b ids: long decimal keys
    for k, start in enumerate(range(0, args.rows, args.shard_rows)):
        block = ids[start : start + args.shard_rows]
        x = np.random.default_rng(k).standard_normal((len(block), 8)).astype(np.float32)
        write_shards(root, "embeddings", f"embed=emb-{k:06d}", embeddings_table(block, x, {}))
    t0 = time.perf_counter()
    items = cluster_items(root, False)
    listing_s = time.perf_counter() - t0
    by_shard = len(json.dumps({"hierarchy-000000": [[i.key, i.fingerprint] for i in items]}))
    by_row = len(json.dumps({"hierarchy-000000": [[str(int(i)), hashlib.sha256(str(i).encode()).hexdigest()]
                                                  for i in ids]}))
    report(f"cluster plan members, {args.rows:,} rows", [
        {"members": "by shard", "entries": len(items), "bytes": by_shard, "listing_s": round(listing_s, 3)},
        {"members": "by row", "entries": args.rows, "bytes": by_row, "listing_s": None}], args.out)


if __name__ == "__main__":
    main()
