"""The ``curate`` command line: one subcommand per stage, each a thin shell over a pipeline."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from catalog.config import ConfigError
from catalog.ledger import LedgerPlanError
from catalog.schemas import CatalogVersionError
from catalog.sql import ReadOnlyError, SQLError
from pipelines.cli.jobs import JobError, add_jobs_command, maybe_submit
from pipelines.cli.sql_output import FORMATS, render
from training.models.checkpoints import CheckpointError

# Errors a user can fix: printed as one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    LedgerPlanError,
    CatalogVersionError,
    ReadOnlyError,
    SQLError,
    CheckpointError,
    FileNotFoundError,
    ValueError,
    JobError,
)

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(fn: Callable[[argparse._SubParsersAction], None]) -> Callable[[argparse._SubParsersAction], None]:
    COMMANDS[fn.__name__] = fn
    return fn


def _add_catalog(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--catalog", required=required, default=None if required else os.environ.get("CURATE_CATALOG"),
                   help="catalog root: a folder or an fsspec URL (s3://bucket/cat, memory://cat)")


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: CURATE_RAY_ADDRESS, else Ray in-process)")


@command
def demo_pool(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-pool", help="write the deterministic demo pool with its ground truth",
                       description="Write about N synthetic-but-realistic images (long-tailed concepts, "
                       "near-duplicates, broken and awkward files) under OUT/pool, a labelled seed set "
                       "under OUT/seed and the ground truth under OUT/truth (never read by curation).")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=10_000, help="number of pool images (default 10000)")
    p.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> None:
        from pipelines.demo.pool import generate_demo_pool

        summary = generate_demo_pool(args.out, n=args.n, seed=args.seed)
        for key, value in summary.items():
            print(f"{key:>24}: {value}")

    p.set_defaults(run=run)


@command
def ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="build the pool table from images",
                       description="List SOURCE (a folder tree, a glob of WebDataset .tar shards, or a "
                       "Parquet file with a 'uri' column or a bytes column), probe every image and "
                       "write the 'pool' table (and 'errors' for unusable files). Resumes after a kill.")
    p.add_argument("source")
    _add_catalog(p)
    _add_address(p)
    p.add_argument("--config", help="YAML file with ingest settings")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--overwrite", action="store_true", help="forget earlier progress of this stage")

    def run(args: argparse.Namespace) -> None:
        from catalog.config import load_config
        from pipelines.stages.ingest import IngestConfig
        from pipelines.stages.ingest import ingest as run_ingest

        config = load_config(IngestConfig, args.config, args.set)
        rows = run_ingest(args.source, args.catalog, config, address=args.address, overwrite=args.overwrite)
        print(f"pool: {rows['in']} files, {rows['out']} usable, {rows['errored']} in errors "
              f"({rows['this_run']} processed in this run)")

    p.set_defaults(run=run)


@command
def embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed the pool's usable images with an SSL backbone",
                       description="Decode every usable pool image (Ray CPU tasks), embed it with the "
                       "backbone (Ray actors: one per GPU, or on CPU) and write the 'embeddings' table "
                       "(float16 fixed-size lists, model id and preprocessing in the file metadata). "
                       "Resumes after a kill; a finished run is not repeated.")
    _add_catalog(p)
    _add_address(p)
    p.add_argument("--model", help="dinov2_vitl14, dinov3_vitl16, … (see training/models/config.py) "
                   "or curate:PATH for a backbone exported by `curate export-backbone`")
    p.add_argument("--weights", help="local checkpoint file of the official release (.pth or .safetensors)")
    p.add_argument("--config", help="YAML file with embed settings")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--overwrite", action="store_true", help="drop existing embeddings and start again")

    def run(args: argparse.Namespace) -> None:
        from catalog.config import load_config
        from pipelines.stages.embed import EmbedConfig
        from pipelines.stages.embed import embed as run_embed

        overrides = list(args.set)
        overrides += [f"model={args.model}"] if args.model else []
        overrides += [f"weights={args.weights}"] if args.weights else []
        config = load_config(EmbedConfig, args.config, overrides)
        rows = run_embed(args.catalog, config, address=args.address, overwrite=args.overwrite)
        print(f"embeddings: {rows['out']} images embedded in this run, {rows['errored']} failed to decode")

    p.set_defaults(run=run)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with this stage's settings (keys as in --set)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set k=32 threshold=0.9")


@command
def dedup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dedup", help="remove exact duplicates, near copies and eval-set overlaps",
                       description="Exact duplicates by sha256; copy detection by a k-NN graph over copy "
                       "descriptors (connected components, the largest image of each kept); relative "
                       "dedup against evaluation sets (--set eval_sets='{name: folder}'). Writes the "
                       "'duplicates' table; clustering and retrieval leave those images out.")
    _add_catalog(p)
    _config_args(p)
    p.add_argument("--overwrite", action="store_true", help="forget earlier dedup results")

    def run(args: argparse.Namespace) -> None:
        from catalog.config import load_config
        from pipelines.stages.dedup import DedupConfig
        from pipelines.stages.dedup import dedup as run_dedup

        counts = run_dedup(args.catalog, load_config(DedupConfig, args.config, args.set), overwrite=args.overwrite)
        print("removed: " + ", ".join(f"{k}={v}" for k, v in counts.items()))

    p.set_defaults(run=run)


@command
def cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="hierarchical k-means with resampling over embeddings",
                       description="Cluster the catalog's embeddings (or --embeddings X.npy --ids IDS.npy, "
                       "or a Parquet file with image_id and embedding columns) into a hierarchy of levels "
                       "(default: 5 levels scaled from the paper's ratios to the pool size) and write the "
                       "'clusters' and 'centroids' tables. Checkpointed per level and resampling step.")
    _add_catalog(p)
    _config_args(p)
    p.add_argument("--levels", type=int, help="number of levels (default 5)")
    p.add_argument("--embeddings", help="bring your own: .npy (with --ids) or .parquet")
    p.add_argument("--ids", help=".npy of int64 image ids matching --embeddings rows")
    p.add_argument("--overwrite", action="store_true", help="discard checkpoints and start again")

    def run(args: argparse.Namespace) -> None:
        from catalog.config import load_config
        from pipelines.stages.cluster import ClusterConfig
        from pipelines.stages.cluster import cluster as run_cluster

        overrides = list(args.set) + ([f"n_levels={args.levels}"] if args.levels else [])
        result = run_cluster(args.catalog, load_config(ClusterConfig, args.config, overrides),
                             embeddings=args.embeddings, ids=args.ids, overwrite=args.overwrite)
        state = "already done" if result["skipped"] else "done"
        print(f"clusters per level (l1 finest): {result['levels']} ({state})")

    p.set_defaults(run=run)


@command
def sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="balanced hierarchical sampling into a curated part",
                       description="Water-fill --target-size over the top-level clusters, then down the "
                       "hierarchy; pick inside level-1 clusters at random (or closest/farthest). Writes "
                       "curated/<part> (default lvd) with each image's uri and cluster lineage.")
    _add_catalog(p)
    _config_args(p)
    p.add_argument("--target-size", type=int, required=True)

    def run(args: argparse.Namespace) -> None:
        from catalog.config import load_config
        from pipelines.stages.sample import SampleConfig
        from pipelines.stages.sample import sample as run_sample

        config = load_config(SampleConfig, args.config, [*args.set, f"target_size={args.target_size}"])
        rows = run_sample(args.catalog, config)
        print(f"curated/{config.part}: {rows['out']} of {rows['in']} images")

    p.set_defaults(run=run)


@command
def build_lvd(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-lvd", help="the whole LVD pipeline: ingest → embed → dedup → cluster → sample",
                       description="Run every stage that is not finished yet and write curated/lvd plus a "
                       "report (cluster-size histograms, contact sheets) under <catalog>/reports/lvd. "
                       "Settings are grouped per stage: --set embed.model=dinov3_vitl16 "
                       "embed.weights=/w/dinov3.pth cluster.n_levels=4 sample.strategy=random")
    _add_catalog(p)
    _add_address(p)
    _config_args(p)
    p.add_argument("--source", help="pool to ingest first (folder, tar glob, Parquet); omit if already ingested")
    p.add_argument("--target-size", type=int, required=True, help="images in the curated part")
    p.add_argument("--levels", type=int, help="hierarchy levels (default 5)")

    def run(args: argparse.Namespace) -> None:
        from catalog.config import load_config
        from pipelines.build_lvd import BuildLVDConfig
        from pipelines.build_lvd import build_lvd as run_build

        overrides = [*args.set, f"sample.target_size={args.target_size}"]
        overrides += [f"cluster.n_levels={args.levels}"] if args.levels else []
        out = run_build(args.catalog, load_config(BuildLVDConfig, args.config, overrides),
                        source=args.source, address=args.address)
        print(f"\ncurated/lvd: {out['sample']['out']} images; report: {', '.join(out.get('report', []))}")

    p.set_defaults(run=run)


@command
def retrieve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieve", help="retrieve pool images that look like a seed dataset",
                       description="Embed the seed exactly like the pool, then take the k nearest pool images "
                       "of every seed image (--mode knn, large seeds) or images from pool clusters holding "
                       "more than a few seed images (--mode cluster, small seeds; needs build-lvd's clusters). "
                       "Duplicates are never retrieved. Writes the seed's rows of 'retrieved' and a contact "
                       "sheet under <catalog>/reports/retrieve/.")
    _add_catalog(p)
    _add_address(p)
    _config_args(p)
    p.add_argument("--seed", required=True, help="a seed name from the seeds config (demo, imagenet, …) or a path")
    p.add_argument("--mode", choices=["auto", "knn", "cluster"])
    p.add_argument("--k", type=int, help="neighbours per seed image in knn mode (default 4)")
    p.add_argument("--max-per-seed", type=int, help="cap on images retrieved for this seed")
    p.add_argument("--min-similarity", type=float, help="cosine floor in knn mode")

    def run(args: argparse.Namespace) -> None:
        from catalog.config import load_config
        from pipelines.stages.retrieve import RetrieveConfig
        from pipelines.stages.retrieve import retrieve as run_retrieve

        flags = {"mode": args.mode, "k": args.k, "max_per_seed": args.max_per_seed,
                 "min_similarity": args.min_similarity}
        overrides = [*args.set, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
        out = run_retrieve(args.catalog, args.seed, load_config(RetrieveConfig, args.config, overrides),
                           address=args.address)
        print(f"seed {out['seed']} ({out['seed_images']} images, {out['mode']} mode): "
              f"{out['retrieved']} pool images retrieved; report: {out['report']}")

    p.set_defaults(run=run)


@command
def mix(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mix", help="assemble the training mix: curated parts and their weights",
                       description="Materialise each part (lvd, retrieved:<seed>, images:<folder>) as "
                       "curated/<name> and write the weights and the homogeneous part to <catalog>/_mix.json.")
    _add_catalog(p)
    _config_args(p)

    def run(args: argparse.Namespace) -> None:
        from catalog.config import load_config
        from pipelines.stages.mix import MixConfig
        from pipelines.stages.mix import mix as run_mix

        doc = run_mix(args.catalog, load_config(MixConfig, args.config, args.set))
        for name, size in doc["parts"].items():
            print(f"{name:>20}: {size:>9} images, weight {doc['weights'][name]:g}")
        if doc["homogeneous_part"]:
            print(f"homogeneous batches from {doc['homogeneous_part']} with p={doc['p_homogeneous']}")

    p.set_defaults(run=run)


@command
def pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="write a curated part as tar shards for fast training reads",
                       description="Copy the images of curated/<part> into WebDataset-style tar shards under "
                       "<catalog>/packed/<part>/ with an index of byte ranges; training then reads the shards "
                       "instead of one object per image. Resumable per shard.")
    _add_catalog(p)
    p.add_argument("--part", required=True)
    p.add_argument("--images-per-shard", type=int, default=1000)

    def run(args: argparse.Namespace) -> None:
        from pipelines.stages.pack import pack as run_pack

        out = run_pack(args.catalog, args.part, args.images_per_shard)
        print(f"packed/{args.part}: {out['packed']} images, {out['unreadable']} unreadable")

    p.set_defaults(run=run)


@command
def train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="DINOv3-style SSL pretraining on the curated parts (FSDP2)",
                       description="Train a ViT with DINO + iBOT + KoLeo on an EMA teacher. One worker trains in "
                       "this process; --num-workers N runs Ray Train's TorchTrainer (FSDP2 over N workers); "
                       "--address http://HEAD:8265 submits the same command as a Ray job. Configs: "
                       "training/configs/*.yaml; overrides as key.sub=value.")
    p.add_argument("--config", required=True,
                   help="training/configs/demo_cpu.yaml, vits16_pretrain.yaml, vit7b16_{pretrain,gram,highres,distill}.yaml, …")
    p.add_argument("--stage", choices=["pretrain", "gram", "highres", "distill"],
                   help="recipe stage (overrides the config's): gram = Gram anchoring, highres = mixed-resolution "
                   "adaptation, distill = students from a frozen teacher; later stages start from init.checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    _add_address(p)

    def run(args: argparse.Namespace) -> int:
        overrides = [*args.overrides, *([f"stage={args.stage}"] if args.stage else [])]
        if args.num_workers > 1 or args.gpus_per_worker > 0 or os.environ.get("CURATE_RAY_ADDRESS"):
            from training.train.config import load_train_config
            from training.train.launch import run_training

            run_training(load_train_config(args.config, overrides), args.num_workers, args.gpus_per_worker,
                         args.address or os.environ.get("CURATE_RAY_ADDRESS"))
            return 0
        from training.train.__main__ import main as train_main

        return train_main(["--config", args.config, *overrides])

    p.set_defaults(run=run)


@command
def ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="the data ablation: one recipe trained on raw, clustering, retrieval and the "
                       "mix, scored alike, one table",
                       description="Train the same backbone config for the same steps and images seen on each arm "
                       "(default: raw = the deduplicated pool, clustering = curated/lvd, retrieval = the images "
                       "retrieved for the demo seed, mix = both plus the labelled seed images as homogeneous "
                       "batches on 10% of steps), over 3 seeds; score every exported teacher with the same "
                       "evaluations (k-NN overall / head / tail concepts, linear probe, instance retrieval, dense "
                       "probe) and write results.json, results.md and results.png under "
                       "<catalog>/ablations/<name>/. Each run is an ordinary training run in "
                       "<catalog>/ablations/<name>/<arm>/seed<k>/; rerunning resumes the unfinished ones only.")
    _add_catalog(p)
    p.add_argument("--config", required=True, help="the training config every arm shares "
                   "(training/configs/demo_cpu.yaml on the demo)")
    p.add_argument("--ablation-config", help="YAML with ablation settings (keys as in --set)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ablation settings, e.g. seeds=[0,1,2] steps=100 train=[optim.lr.peak=5e-4] "
                   "'arms={raw: {parts: {pool: {source: pool}}}, lvd: {parts: {lvd: {source: lvd}}}}' "
                   "demo_pool='' evals.labelled=/data/labelled evals.frequency=/data/freq.json")
    p.add_argument("--name", help="the ablation's folder under <catalog>/ablations (default: default, or quick with --quick)")
    p.add_argument("--quick", action="store_true", help="the whole ablation in miniature: one seed, 6 steps")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per run")
    p.add_argument("--gpus-per-worker", type=float, default=0)
    # dest differs from the stages' "address": ablate submits its own jobs (one per arm) instead of one job
    p.add_argument("--address", dest="cluster", default=None,
                   help="Ray dashboard URL http://HEAD:8265: prepare, each arm and the report run as Ray jobs, the "
                   "arms at the same time where the cluster's resources allow (default: CURATE_RAY_ADDRESS)")
    p.add_argument("--only", metavar="PHASE", help="prepare, arm:<name> or report: one phase (what each job runs)")

    def run(args: argparse.Namespace) -> None:
        from catalog.config import load_config
        from pipelines.ablate.ablation import ablate as run_ablate
        from pipelines.ablate.config import QUICK, AblationConfig

        quick = [*QUICK, "name=quick"] if args.quick else []
        name = [f"name={args.name}"] if args.name else []
        config = load_config(AblationConfig, args.ablation_config, [*quick, *name, *args.set])
        job_argv = ["ablate", "--catalog", args.catalog, "--config", args.config, "--name", config.name,
                    "--num-workers", str(args.num_workers), "--gpus-per-worker", str(args.gpus_per_worker),
                    *(["--ablation-config", args.ablation_config] if args.ablation_config else []),
                    *(["--quick"] if args.quick else []), *(["--set", *args.set] if args.set else [])]
        run_ablate(args.catalog, args.config, config, only=args.only,
                   address=args.cluster or os.environ.get("CURATE_RAY_ADDRESS"), num_workers=args.num_workers,
                   gpus_per_worker=args.gpus_per_worker, job_argv=job_argv)

    p.set_defaults(run=run)


@command
def export_backbone(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-backbone", help="write a training checkpoint's teacher backbone for `curate embed`",
                       description="Export the EMA teacher of CKPT (a checkpoint dir, or a run's output dir for "
                       "its latest checkpoint) to OUT (.safetensors), readable by `curate embed --model curate:OUT`.")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--config", help="the run's config (default: <run>/config.yaml)")

    def run(args: argparse.Namespace) -> int:
        from training.train.export import main as export_main

        run_dir = args.ckpt if os.path.isfile(os.path.join(args.ckpt, "config.yaml")) else \
            os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt)))
        config = args.config or os.path.join(run_dir, "config.yaml")
        extra = [] if run_dir == args.ckpt else ["--checkpoint", args.ckpt]
        return export_main(["--config", config, "--out", args.out, *extra])

    p.set_defaults(run=run)


@command
def inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a catalog's tables and last runs")
    p.add_argument("root")

    def run(args: argparse.Namespace) -> None:
        from pipelines.cli.report_text import inspect_text

        print(inspect_text(args.root))

    p.set_defaults(run=run)


@command
def sql(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sql", help="query a catalog with DuckDB (read-only)",
                       description="Every catalog table is a view under its own name (curated parts as "
                       "curated_<part> and all together as curated). Only queries are allowed (not EXPLAIN "
                       "ANALYZE), and they read only the catalog: no other files or URLs, no extensions.")
    p.add_argument("query")
    _add_catalog(p, required=False)
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--out", help="write the result here instead of stdout")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown by --format table")

    def run(args: argparse.Namespace) -> None:
        from catalog.sql import query

        if not args.catalog:
            raise ValueError("give --catalog ROOT (or set CURATE_CATALOG)")
        render(query(args.catalog, args.query), args.format, args.out, args.max_rows)

    p.set_defaults(run=run)


@command
def demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the README's main job: demo pool → catalog, with a summary",
                       description="Generate the demo pool (once), run the pipeline on it into "
                       "OUT/catalog, and print where to look.")
    p.add_argument("out", nargs="?", default="demo_out")
    p.add_argument("--n", type=int, default=10_000)

    def run(args: argparse.Namespace) -> None:
        from pipelines.demo.job import run_demo

        run_demo(args.out, n=args.n)

    p.set_defaults(run=run)


COMMANDS["jobs"] = add_jobs_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate",
        description="Curate a raw image pool into a balanced, diverse training set (DINOv3-style) "
        "and pretrain a ViT on it. Every stage reads and writes a Parquet catalog.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if not maybe_submit(args, argv):  # an http:// --address runs the command as a Ray job
            return int(args.run(args) or 0)
    except USER_ERRORS as e:
        print(f"curate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"curate {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
