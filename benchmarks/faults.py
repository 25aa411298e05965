"""The fault suite's longer form: many seeded trials of what tests/faults/ checks once.

- kill trials: ``curate ingest`` and ``curate embed`` SIGKILLed at two seeded points (part-way, then
  during the resume) and resumed; "resumed exactly" means the final tables equal an uninterrupted run's
  (pool, errors, copy descriptors; embeddings bit for bit) with no duplicate row;
- bad inputs: the malformed-image corpus of ``tests.faults.malformed`` for several seeds, ingested;
  "handled" means one pool row per file and an errors row with a reason for every file the decoder
  refuses (and none for one it reads);
- probes: a corrupt shard planted in a table (garbage, truncated, another table's) must be refused by
  ``curate sql`` naming the file; a second writer of a run whose lease is held must be refused naming
  the holder.

    python -m benchmarks.faults --trials 4 --out docs/results/faults.json
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import report
from catalog import lease
from catalog.embeddings import load_embeddings
from catalog.shards import CorruptShardError
from catalog.sql import query
from pipelines.demo.pool import generate_demo_pool
from tests.faults.kills import killed_and_resumed
from tests.faults.malformed import corpus, decodes
from tests.helpers import run_cli

INGEST = ["--set", "files_per_unit=20", "--executor", "local"]
EMBED = ["embed", "--set", "model=vit_test", "image_size=32", "images_per_unit=20", "batch_size=10",
         "--executor", "local"]
POOL = "SELECT image_id, uri, bytes, width, height, format, sha256, status FROM pool ORDER BY image_id"
ERRORS = "SELECT image_id, uri, reason FROM errors ORDER BY image_id"


def _same_embeddings(a: str, b: str, table: str) -> bool:
    ids, x = load_embeddings(a, table)
    ref_ids, ref_x = load_embeddings(b, table)
    order, ref_order = np.argsort(ids), np.argsort(ref_ids)
    return (len(set(ids.tolist())) == len(ids) and np.array_equal(ids[order], ref_ids[ref_order])
            and np.array_equal(x[order].view(np.uint8), ref_x[ref_order].view(np.uint8)))


def kill_trials(source: str, reference: str, work: str, trials: int, embed_trials: int) -> list[dict]:
    rows = []
    for stage, n, units in (("ingest", trials, 8), ("embed", embed_trials, 7)):
        exact = 0
        start = time.perf_counter()
        for seed in range(n):
            root = os.path.join(work, f"{stage}-{seed}")
            if stage == "ingest":
                killed_and_resumed(["ingest", source, *INGEST], root, "ingest", seed, units)
                ok = (query(root, POOL) == query(reference, POOL) and query(root, ERRORS) == query(reference, ERRORS)
                      and _same_embeddings(root, reference, "copy_descriptors"))
            else:
                shutil.copytree(reference, root, ignore=shutil.ignore_patterns("embeddings", "_ledger", "_leases"))
                shutil.copytree(os.path.join(reference, "_ledger", "ingest"), os.path.join(root, "_ledger", "ingest"))
                killed_and_resumed(EMBED, root, "embed", 1000 + seed, units)
                ok = _same_embeddings(root, reference, "embeddings")
            exact += ok
        rows.append({"fault": f"SIGKILL x2 ({stage})", "trials": n, "ok": exact,
                     "what ok means": "resumed exactly", "s": time.perf_counter() - start})
    return rows


def bad_input_trials(work: str, seeds: int) -> dict:
    tried = handled = 0
    start = time.perf_counter()
    for seed in range(seeds):
        src = os.path.join(work, f"malformed-{seed}")
        os.makedirs(src)
        files = corpus(seed=seed)
        for name, data in files.items():
            with open(os.path.join(src, name), "wb") as f:
                f.write(data)
        root = os.path.join(work, f"malformed-cat-{seed}")
        assert run_cli(["ingest", src, "--catalog", root, "--executor", "local"]).returncode == 0
        rows = query(root, "SELECT p.uri, p.status, e.reason FROM pool p LEFT JOIN errors e USING (image_id)")
        by_name = {r["uri"].rsplit("/", 1)[1]: r for r in rows.to_pylist()}
        tried += len(files)
        handled += sum(name in by_name and (by_name[name]["status"] == "ok") == decodes(data)
                       and (by_name[name]["reason"] is None) == (by_name[name]["status"] == "ok")
                       for name, data in files.items())
    return {"fault": "malformed image", "trials": tried, "ok": handled, "what ok means": "handled",
            "s": time.perf_counter() - start}


def probe_trials(reference: str, work: str) -> list[dict]:
    planted = refused = 0
    start = time.perf_counter()
    for table in ("pool", "errors", "copy_descriptors", "embeddings"):
        for kind in ("garbage", "truncated", "other_table"):
            root = shutil.copytree(reference, os.path.join(work, f"probe-{table}-{kind}"))
            good = sorted(glob.glob(os.path.join(root, table, "*.parquet")))[0]
            bad = os.path.join(root, table, f"planted-{kind}.parquet")
            data = open(good, "rb").read()
            other = "pool" if table != "pool" else "errors"
            content = {"garbage": b"PAR1" + os.urandom(2000), "truncated": data[: len(data) * 2 // 3],
                       "other_table": open(sorted(glob.glob(os.path.join(root, other, "*.parquet")))[0], "rb").read()}
            with open(bad, "wb") as f:
                f.write(content[kind])
            planted += 1
            try:
                query(root, f"SELECT count(*) FROM {table}")
            except CorruptShardError as e:
                refused += bad in str(e)
    rows = [{"fault": "corrupt shard planted", "trials": planted, "ok": refused, "what ok means": "refused by name",
             "s": time.perf_counter() - start}]
    start = time.perf_counter()
    held = refused = 0
    for run in ("ingest", "embed", "dedup", "cluster", "sample"):
        root = os.path.join(work, "leases")
        with lease.hold(root, run):
            for _ in range(3):
                held += 1
                try:
                    lease.acquire(root, run)
                except lease.LeaseHeldError as e:
                    refused += f"pid {os.getpid()}" in str(e)
    rows.append({"fault": "second writer (lease held)", "trials": held, "ok": refused,
                 "what ok means": "refused naming the holder", "s": time.perf_counter() - start})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4, help="kill trials of ingest (embed gets half)")
    parser.add_argument("--corpus-seeds", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="curate-faults-")
    try:
        generate_demo_pool(os.path.join(work, "demo"), n=160, seed=0)
        source = os.path.join(work, "demo", "pool")
        reference = os.path.join(work, "reference")
        assert run_cli(["ingest", source, *INGEST, "--catalog", reference]).returncode == 0
        assert run_cli([*EMBED, "--catalog", reference]).returncode == 0
        rows = kill_trials(source, reference, work, args.trials, max(1, args.trials // 2))
        rows.append(bad_input_trials(work, args.corpus_seeds))
        rows += probe_trials(reference, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report("Fault trials (a 160-image demo pool)", rows, args.out)


if __name__ == "__main__":
    main()
