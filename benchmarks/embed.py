"""Embedding throughput: the model alone vs. the `curate embed` stage from JPEG files to Parquet shards.

Both are measured in one run, over demo-pool JPEGs (rendered concepts, 256-400 px). The stage runs in
one of two ways, each its own code (``load``, ``setup``, ``process``, the commit of shards and ledger):

- ``--driver ray`` (CPU default): `run_stage` on Ray Data, after an (untimed) ingest.
- ``--driver direct`` (CUDA default; the lent GPU machine has no Ray nor DuckDB): the stage's methods
  called as Ray would call them: ``load`` in a pool of processes standing in for the decode tasks
  (forked before CUDA starts), ``setup`` once, ``process`` and the commit for ``units_in_flight`` units
  at once, as the threaded actor runs them. Units are what the runner cuts (`item_units`), from the file list.

``--decode`` chooses the stage's decode path(s): ``device`` (plain JPEGs decoded on the model's device:
nvJPEG on CUDA) and/or ``host`` (decode tasks decode everything). The model-only rate is the backbone
on a batch held on the device (bf16 autocast on CUDA, as the stage runs it).

    python -m benchmarks.embed --images 512 --out bench_out/embed_cpu.json
    python -m benchmarks.embed --device cuda --model dinov3_vitl16 --images 32768 --batch 256 --decode device host
    python -m benchmarks.embed --driver direct --decode device host --model vit_test --size 32 --images 256
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import report  # noqa: E402


def _write_jpeg(args: tuple[str, int]) -> str:
    from pipelines.demo.concepts import CONCEPTS, render_concept_image

    folder, i = args
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(256, 400)), int(rng.integers(256, 400))
    img, _ = render_concept_image(int(rng.integers(len(CONCEPTS))), int(rng.integers(1 << 30)), (w, h))
    path = os.path.join(folder, f"{i:06d}.jpg")
    img.save(path, quality=90)
    return path


def make_jpegs(folder: str, n: int) -> list[str]:
    """n realistic JPEGs (demo-pool concepts, 256–400 px) so decoding costs what it costs."""
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(_write_jpeg, [(folder, i) for i in range(n)], chunksize=64))


def model_only(model, size: int, batch: int, steps: int, device: str) -> float:
    import torch

    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        model.embed(x)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            model.embed(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def stage_on_ray(folder: str, root: str, config) -> dict:
    """The product path on a Ray cluster: ingest (untimed), then the embed stage on Ray Data, timed."""
    from catalog.ray_runtime import ensure_ray
    from pipelines.stage import run_stage

    run_stage("ingest", root, {"source": folder})
    ensure_ray()
    t0 = time.perf_counter()
    summary = run_stage("embed", root, config, executor="ray").summary
    return {"seconds": time.perf_counter() - t0, "images": summary["out"], "errored": summary["errored"]}


def stage_direct(paths: list[str], root: str, config, loads: Executor) -> dict:
    """The stage's own methods, called as its Ray executor would: loads in ``loads``, ``units_in_flight``
    units processed and committed at once by one worker state; timed from the first load to the last commit."""
    from dataclasses import replace

    from catalog.manifest import fingerprint
    from pipelines.stage import CatalogSink, StageContext, Unit, process_and_commit
    from pipelines.stages.embed import STAGE

    stage = STAGE
    ctx = StageContext(root, config, stage.name)
    ctx = replace(ctx, facts=stage.prepare(ctx))
    n = config.images_per_unit
    units = [Unit(f"emb-{k // n:06d}", {"ids": list(range(k, k + n))[: len(paths) - k], "uris": paths[k : k + n]},
                  len(paths[k : k + n]), fingerprint(paths[k : k + n])) for k in range(0, len(paths), n)]
    sink = CatalogSink(root, stage.name, stage.tables_written(config))
    t_setup = time.perf_counter()
    state = stage.setup(ctx)
    setup_s = time.perf_counter() - t_setup
    units_in_flight = config.units_in_flight if ctx.facts.decode == "device" else 1
    t0 = time.perf_counter()
    with ThreadPoolExecutor(units_in_flight) as workers:
        loaded = [loads.submit(stage.load, ctx, u) for u in units]
        done = [workers.submit(lambda u, f: process_and_commit(stage, ctx, sink, u, state, f.result()), u, f)
                for u, f in zip(units, loaded)]
        markers = [d.result() for d in done]
    seconds = time.perf_counter() - t0
    out = sum(m["rows"].get("embeddings", 0) for m in markers)
    return {"seconds": seconds, "images": out, "errored": sum(m["rows"].get("errors", 0) for m in markers),
            "setup_s": setup_s, "decode_resolved": ctx.facts.decode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, help="default: dinov3_vits16 on CPU, dinov3_vitl16 on CUDA")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--images-per-unit", type=int, default=None, help="default: 4 batches")
    p.add_argument("--units-in-flight", type=int, default=2)
    p.add_argument("--decode", nargs="+", default=None, choices=["host", "device"],
                   help="decode paths to measure (default: device and host on CUDA, host on CPU)")
    p.add_argument("--driver", default=None, choices=["ray", "direct"], help="default: ray on CPU, direct on CUDA")
    p.add_argument("--load-workers", type=int, default=os.cpu_count(), help="direct: decode-task processes")
    p.add_argument("--steps", type=int, default=5, help="model-only timed batches")
    p.add_argument("--out")
    args = p.parse_args()
    os.environ.setdefault("CURATE_PROGRESS", "0")
    from pipelines.stages.embed import EmbedConfig
    from training.models.checkpoints import load_backbone

    cuda = args.device == "cuda"
    name = args.model or ("dinov3_vitl16" if cuda else "dinov3_vits16")
    batch = args.batch or (256 if cuda else 32)
    driver = args.driver or ("direct" if cuda else "ray")
    decodes = args.decode or (["device", "host"] if cuda else ["host"])
    loads = None
    if driver == "direct":  # the decode tasks' stand-in, forked now, before CUDA starts in this process
        loads = ProcessPoolExecutor(args.load_workers, mp_context=multiprocessing.get_context("fork"))
        loads.submit(int).result()
    model, _ = load_backbone(name, None, device=args.device)
    rate_model = model_only(model, args.size, batch, args.steps, args.device)
    del model
    rows = []
    with tempfile.TemporaryDirectory() as work:
        t0 = time.time()
        os.makedirs(os.path.join(work, "jpegs"))
        paths = make_jpegs(os.path.join(work, "jpegs"), args.images)
        generation_s = time.time() - t0
        for decode in decodes:
            config = EmbedConfig(model=name, image_size=args.size, batch_size=batch, decode=decode,
                                 images_per_unit=args.images_per_unit or 4 * batch,
                                 units_in_flight=args.units_in_flight,
                                 random_init=True)  # throughput does not depend on the weights
            root = os.path.join(work, f"catalog-{decode}")
            if driver == "ray":
                run = stage_on_ray(os.path.join(work, "jpegs"), root, config)
            else:
                run = stage_direct(paths, root, config, loads)
            rate = run["images"] / run["seconds"]
            rows.append({"model": name, "device": args.device, "size": args.size, "batch": batch, "driver": driver,
                         "decode": decode, "model_only_img_s": rate_model, "end_to_end_img_s": rate,
                         "ratio": rate / rate_model, **run})
    if loads is not None:
        loads.shutdown()
    report("embedding throughput: model only vs. the embed stage from JPEG files to Parquet", rows, args.out,
           {"jpeg_generation_s": generation_s, "target_ratio": 0.9 if cuda else 0.8})


if __name__ == "__main__":
    main()
