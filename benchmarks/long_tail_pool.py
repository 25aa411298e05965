"""A long-tailed synthetic embedding pool on disk, as a user would bring it to ``curate cluster``.

    .venv/bin/python -m benchmarks.long_tail_pool /tmp/pool200k --n 200000 --d 384

Writes ``embeddings.npy`` (float32, rows L2-normalised), ``ids.npy`` (int64 image ids, here the row
numbers) and ``concepts.npy`` (the generator's concept per row, the ground truth for balance). The
mixture is `curation.synthetic.concept_embeddings`: 1,000 Zipf-sized concepts in 50 super-concepts.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from curation.synthetic import concept_embeddings

FILES = ("embeddings.npy", "ids.npy", "concepts.npy")


def write_pool(out: str, n: int = 200_000, d: int = 384, n_concepts: int = 1000, seed: int = 0) -> dict[str, str]:
    """Write the pool's three files under ``out`` (kept if already there for the same arguments)."""
    os.makedirs(out, exist_ok=True)
    paths = {name.removesuffix(".npy"): os.path.join(out, name) for name in FILES}
    stamp = os.path.join(out, "args.txt")
    args = f"n={n} d={d} concepts={n_concepts} seed={seed}"
    if os.path.exists(stamp) and all(map(os.path.exists, paths.values())):
        with open(stamp) as f:
            if f.read() == args:
                return paths
    x, concept, _ = concept_embeddings(n, d, n_concepts, seed=seed)
    np.save(paths["embeddings"], x)
    np.save(paths["ids"], np.arange(n, dtype=np.int64))
    np.save(paths["concepts"], concept.astype(np.int64))
    with open(stamp, "w") as f:
        f.write(args)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--concepts", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for name, path in write_pool(a.out, a.n, a.d, a.concepts, a.seed).items():
        print(f"{name:10s} {path}")


if __name__ == "__main__":
    main()
