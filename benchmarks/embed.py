"""Embedding throughput: the model alone vs. the whole path from JPEG files to Parquet embeddings.

CPU (default): ViT-S/16 at 224, model-only on a batch held in memory, then the real `curate embed`
stage (Ray Data decode tasks → model actor → Parquet shards) over the same number of JPEG files.
CUDA (`--device cuda`): ViT-L/16 at 224 in bf16, model-only, then files → GPU JPEG decoding
(torchvision.io.decode_jpeg on the GPU) → resize/crop on the GPU → model → Parquet shards.

    python benchmarks/embed.py --images 512 --out bench_out/embed_cpu.json
    python benchmarks/embed.py --device cuda --model dinov3_vitl16 --images 4096 --batch 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

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
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(_write_jpeg, [(folder, i) for i in range(n)], chunksize=64))


def model_only(model, size: int, batch: int, steps: int, device: str, dtype) -> float:
    import torch

    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
        model.embed(x)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            model.embed(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def end_to_end_cpu(folder: str, model_name: str, size: int, batch: int) -> tuple[float, int]:
    """The product path: ingest (untimed), then the Ray Data embed stage, timed."""
    from catalog.ray_runtime import ensure_ray
    from pipelines.stage import run_stage
    from pipelines.stages.embed import EmbedConfig

    root = os.path.join(folder, "catalog")
    run_stage("ingest", root, {"source": folder})
    ensure_ray()
    config = EmbedConfig(model=model_name, image_size=size, batch_size=batch, images_per_unit=4 * batch,
                         random_init=True)  # throughput does not depend on the weights
    t0 = time.perf_counter()
    rows = run_stage("embed", root, config, executor="ray").summary
    return rows["out"] / (time.perf_counter() - t0), rows["out"]


def end_to_end_cuda(paths: list[str], model, size: int, batch: int, out_dir: str) -> tuple[float, int, dict]:
    """Files → GPU decode → GPU resize/crop/normalise → bf16 model → float16 Parquet shards.

    Three overlapped stages: a thread reads files and decodes/resizes on a side CUDA stream, the main
    thread runs the model, and a writer thread compresses and commits the Parquet shards. Also returns
    where the time went: the producer's seconds in decode+resize calls, and the model loop's seconds
    waiting for a batch (large: decoding is the bottleneck) or for the writer.
    """
    import queue
    import threading

    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    from catalog.embeddings import embeddings_table
    from catalog.shards import write_shards

    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1) * 255
    resize = round(size * 256 / 224)
    side = torch.cuda.Stream()

    def read(path: str) -> torch.Tensor:
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)

    def prep(img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        s = resize / min(h, w)
        img = F.interpolate(img[None].float(), size=(max(resize, round(h * s)), max(resize, round(w * s))),
                            mode="bicubic", antialias=True, align_corners=False)
        top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
        return img[0, :, top : top + size, left : left + size]

    batches = [paths[i : i + batch] for i in range(0, len(paths), batch)]
    ready: queue.Queue = queue.Queue(maxsize=3)
    done: queue.Queue = queue.Queue(maxsize=3)
    spent = {"producer_decode_s": 0.0, "model_waits_for_batch_s": 0.0, "model_waits_for_writer_s": 0.0}

    def producer() -> None:
        with ThreadPoolExecutor(8) as pool:
            for data in pool.map(lambda b: [read(p) for p in b], batches):
                t_decode = time.perf_counter()
                with torch.cuda.stream(side):
                    imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
                    x = (torch.stack([prep(im) for im in imgs]) - mean) / std
                    event = torch.cuda.Event()
                    event.record(side)
                spent["producer_decode_s"] += time.perf_counter() - t_decode
                ready.put((x, event))
        ready.put(None)

    def writer() -> None:
        while (item := done.get()) is not None:
            i, emb = item
            ids = np.arange(i * batch, i * batch + len(emb), dtype=np.int64)
            write_shards(out_dir, "embeddings", f"b{i:05d}", embeddings_table(ids, emb, {}))

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=producer), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    i = 0
    while True:
        t_wait = time.perf_counter()
        item = ready.get()
        spent["model_waits_for_batch_s"] += time.perf_counter() - t_wait
        if item is None:
            break
        x, event = item
        torch.cuda.current_stream().wait_event(event)
        x.record_stream(torch.cuda.current_stream())  # made on the side stream, freed after use here
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            emb = model.embed(x)
        emb = emb.half().cpu().numpy()
        t_wait = time.perf_counter()
        done.put((i, emb))
        spent["model_waits_for_writer_s"] += time.perf_counter() - t_wait
        i += 1
    done.put(None)
    for t in threads:
        t.join()
    return len(paths) / (time.perf_counter() - t0), len(paths), spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, help="default: dinov3_vits16 on CPU, dinov3_vitl16 on CUDA")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=5, help="model-only timed batches")
    p.add_argument("--out")
    args = p.parse_args()
    os.environ.setdefault("CURATE_PROGRESS", "0")
    import torch

    from training.models.checkpoints import load_backbone

    cuda = args.device == "cuda"
    name = args.model or ("dinov3_vitl16" if cuda else "dinov3_vits16")
    batch = args.batch or (256 if cuda else 32)
    model, _ = load_backbone(name, None, device=args.device)
    rate_model = model_only(model, args.size, batch, args.steps, args.device, torch.bfloat16)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.time()
        paths = make_jpegs(work, args.images)
        gen = time.time() - t0
        spent = {}
        if cuda:
            rate_e2e, n, spent = end_to_end_cuda(paths, model, args.size, batch, os.path.join(work, "cat"))
        else:
            rate_e2e, n = end_to_end_cpu(work, name, args.size, batch)
    rows = [{"model": name, "device": args.device, "size": args.size, "batch": batch,
             "model_only_img_s": rate_model, "end_to_end_img_s": rate_e2e, "ratio": rate_e2e / rate_model,
             "images": n, **spent}]
    report("embedding throughput: model only vs. JPEG files → Parquet", rows, args.out,
           {"jpeg_generation_s": gen, "target_ratio": 0.9 if cuda else 0.8})


if __name__ == "__main__":
    main()
