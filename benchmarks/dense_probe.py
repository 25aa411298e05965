"""Dense-feature quality before/after Gram anchoring: demo-model pretrain -> gram on demo-pool concept images.

Renders shape/digit concepts of the demo pool (known object masks) into a small catalog, pretrains the
demo model (``demo_cpu.yaml``: vit_demo, patch 8, 48 px global crops), then (a) a Gram stage from its
checkpoint (Gram teacher = the pretrain EMA teacher on 96 px crops, never refreshed) and (b) the same
number of plain pretrain steps from it (control), and reports a linear per-patch segmentation probe of each EMA teacher on held-out
images, as the trainer logs it at checkpoints (``eval.dense_probe`` -> ``evals.jsonl``). CPU minutes:

    .venv/bin/python -m benchmarks.dense_probe --out docs/results/dense_probe_cpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.common import report
from catalog.shards import write_shards
from pipelines.demo.concepts import dense_probe_set
from training.models import load_backbone
from training.train.config import EvalConfig, load_train_config
from training.train.evals import CheckpointEvals
from training.train.loop import train
from training.train.run_state import EVALS_FILE, read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"


def write_catalog(root: Path, images: np.ndarray) -> str:
    from PIL import Image

    catalog, folder = str(root / "catalog"), root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i, image in enumerate(images):
        path = folder / f"{i}.jpg"
        Image.fromarray(image).save(path, quality=92)
        uris.append(str(path))
    half = len(uris) // 2
    for part, sl in (("shapes_a", slice(0, half)), ("shapes_b", slice(half, None))):
        ids = list(range(1 + sl.indices(len(uris))[0], 1 + sl.indices(len(uris))[1]))
        table = pa.table({"image_id": pa.array(ids, pa.int64()), "uri": uris[sl], "part": [part] * len(ids)})
        write_shards(catalog, f"curated/{part}", "u0", table)
    return catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--probe-images", type=int, default=96, help="half to fit the probe, half to score it")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--probe-size", type=int, default=96)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--gram-steps", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dense_probe_"))
    catalog = write_catalog(root, dense_probe_set(args.train_images, args.image_size, seed=1)[0])
    images, masks = dense_probe_set(args.probe_images, args.probe_size, seed=2)
    np.savez_compressed(root / "probe.npz", images=images, masks=masks)
    # Each run scores its EMA teacher at its last checkpoint (evals.jsonl), as any run with eval.dense_probe does.
    common = [f"data.catalog_root={catalog}", "data.parts=[shapes_a, shapes_b]", "checkpoint.period=1000",
              f"eval.dense_probe={root / 'probe.npz'}"]
    continuation = [f"optim.iterations={args.gram_steps}", f"init.checkpoint={root / 'pretrain'}",
                    "optim.lr.warmup_iterations=0", "optim.freeze_last_layer_iterations=0"]
    gram = ["stage=gram", "gram.teacher_size=96", "gram.weight.peak=2.0", "gram.weight.end=2.0",
            "gram.weight.warmup_iterations=5", "gram.max_updates=0"]
    runs = {
        "pretrain": [f"optim.iterations={args.pretrain_steps}"],
        "pretrain+plain": continuation,
        "pretrain+gram": continuation + gram,
    }
    probe = CheckpointEvals(EvalConfig(dense_probe=str(root / "probe.npz")), args.probe_size, patch_size=8)
    rows = [{"model": "random init", "steps": 0, "seconds": 0.0, **probe(load_backbone("vit_demo", None)[0])}]
    for name, overrides in runs.items():
        out = root / name
        t0 = time.perf_counter()
        config = load_train_config(str(CONFIGS / "demo_cpu.yaml"), [*common, f"output_dir={out}", *overrides])
        train(config)
        seconds = time.perf_counter() - t0
        scores = {k: v for k, v in read_metrics(out, EVALS_FILE)[-1].items() if k != "step"}
        rows.append({"model": name, "steps": config.optim.iterations, "seconds": round(seconds, 1), **scores})
    report("dense probe (linear per-patch object/background) before and after Gram anchoring", rows, args.out,
           {"args": vars(args)})


if __name__ == "__main__":
    main()
