"""The ``curate`` command line: the stage commands (one table, `pipelines.cli.stage_commands`), ``explore``
(a site whose thumbnails are a stage, `pipelines.cli.explore_command`) and the commands that are not stages
(demo, sql, inspect, jobs, train, export-backbone).

Errors a user can fix (`catalog.errors.UserError` and its subclasses) print as one line and exit 2;
anything else is a bug and prints its traceback (``--debug`` prints one for every error). Library code
logs to the ``curate`` logger (``--verbose`` / ``--quiet``); a command's own result lines go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from catalog.errors import UserError
from catalog.threads import OVERRIDE_ENV, configure_threads
from pipelines.cli.explore_command import add_explore_command
from pipelines.cli.jobs import add_jobs_command, maybe_submit
from pipelines.cli.stage_commands import STAGE_COMMANDS, add_stage_command

Adder = Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None]
COMMANDS: dict[str, Adder] = {}


def command(fn: Adder) -> Adder:
    COMMANDS[fn.__name__.replace("_", "-")] = fn
    return fn


def common_options() -> argparse.ArgumentParser:
    """Options every command takes, wherever they are written on the line."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--verbose", "-v", action="store_true", help="log debug detail")
    p.add_argument("--quiet", "-q", action="store_true", help="log warnings and errors only")
    p.add_argument("--debug", action="store_true", help="print a traceback for every error, not just bugs")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for each thread pool (torch, OpenMP/BLAS, faiss) of this process and of the Ray "
                   "workers it starts; default: the CPUs the process may use (affinity mask, container quota; "
                   "inside a Ray worker the CPUs Ray gave it). The same as CURATE_THREADS=N")
    return p


@command
def demo_pool(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo-pool", parents=[common], help="write the deterministic demo pool with its ground truth",
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
def train(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="DINOv3-style SSL pretraining on the curated parts (FSDP2)",
                       description="Train a ViT with DINO + iBOT + KoLeo on an EMA teacher. One worker trains in "
                       "this process; --num-workers N runs Ray Train's TorchTrainer (FSDP2 over N workers); "
                       "--address http://HEAD:8265 submits the same command as a Ray job. Reads the curated "
                       "parts of data.catalog_root; writes checkpoints, metrics and the exported teacher under "
                       "output_dir.",
                       epilog="Configs: training/configs/*.yaml; override keys with --set key.sub=value (as every "
                       "command). Positional KEY=VALUE overrides still work but are deprecated.")
    p.add_argument("--config", required=True,
                   help="training/configs/demo_cpu.yaml, vits16_pretrain.yaml, "
                   "vit7b16_{pretrain,gram,highres,distill}.yaml, …")
    p.add_argument("--stage", choices=["pretrain", "gram", "highres", "distill"],
                   help="recipe stage (overrides the config's): gram = Gram anchoring, highres = mixed-resolution "
                   "adaptation, distill = students from a frozen teacher; later stages start from init.checkpoint")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="deprecated: use --set")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--address", default=None, help="Ray cluster (default: CURATE_RAY_ADDRESS, else this process)")

    def run(args: argparse.Namespace) -> int:
        if args.overrides:
            logging.getLogger("curate.pipelines").warning(
                "positional KEY=VALUE overrides are deprecated: write --set %s", " ".join(args.overrides))
        overrides = [*args.set, *args.overrides, *([f"stage={args.stage}"] if args.stage else [])]
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
def ablate(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ablate", parents=[common],
                       help="the data ablation: one recipe trained on raw, clustering, retrieval and the mix, "
                       "scored alike, one table",
                       description="Train the same backbone config for the same steps and images seen on each arm "
                       "(default: raw = the deduplicated pool, clustering = curated/lvd, retrieval = the images "
                       "retrieved for the demo seed, mix = both plus the labelled seed images as homogeneous "
                       "batches on 10% of steps), over 3 seeds; score every exported teacher with the same "
                       "evaluations (k-NN overall / head / tail concepts, linear probe, instance retrieval, dense "
                       "probe) and write results.json, results.md and results.png under "
                       "<catalog>/ablations/<name>/. Each run is an ordinary training run in "
                       "<catalog>/ablations/<name>/<arm>/seed<k>/; rerunning resumes the unfinished ones only.")
    p.add_argument("--catalog", required=True, help="catalog root: a folder or an fsspec URL")
    p.add_argument("--config", required=True, help="the training config every arm shares "
                   "(training/configs/demo_cpu.yaml on the demo)")
    p.add_argument("--ablation-config", help="YAML with ablation settings (keys as in --set)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="ablation settings, e.g. seeds=[0,1,2] steps=100 train=[optim.lr.peak=5e-4] "
                   "'arms={raw: {parts: {pool: {source: pool}}}, lvd: {parts: {lvd: {source: lvd}}}}' "
                   "demo_pool='' evals.labelled=/data/labelled evals.frequency=/data/freq.json")
    p.add_argument("--name", help="the ablation's folder under <catalog>/ablations "
                   "(default: default, or quick with --quick)")
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
def export_backbone(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export-backbone", parents=[common],
                       help="write a training checkpoint's teacher backbone for `curate embed`",
                       description="Export the EMA teacher of CKPT (a checkpoint dir, or a run's output dir for "
                       "its latest checkpoint) to OUT (.safetensors, with its ViT config and input resolution, "
                       "mean and std in the metadata), readable by `curate embed --model curate:OUT`.")
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
def inspect(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("inspect", parents=[common], help="show a catalog's tables and last runs",
                       description="List every table of ROOT (rows, shards, bytes, metadata) and the manifests "
                       "of its last runs (config, rows, wall time, peak memory). Reads only.")
    p.add_argument("root")

    def run(args: argparse.Namespace) -> None:
        from pipelines.cli.report_text import inspect_text

        print(inspect_text(args.root))

    p.set_defaults(run=run)


@command
def sql(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from pipelines.cli.sql_output import FORMATS

    p = sub.add_parser("sql", parents=[common], help="query a catalog with DuckDB (read-only)",
                       description="Every catalog table is a view under its own name (curated parts as "
                       "curated_<part> and all together as curated). Only queries are allowed (not EXPLAIN "
                       "ANALYZE), and they read only the catalog: no other files or URLs, no extensions.")
    p.add_argument("query")
    p.add_argument("--catalog", default=os.environ.get("CURATE_CATALOG"),
                   help="catalog root: a folder or an fsspec URL (default: CURATE_CATALOG)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--out", help="write the result here instead of stdout")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown by --format table (default 40)")

    def run(args: argparse.Namespace) -> None:
        from catalog.sql import query
        from pipelines.cli.sql_output import render

        if not args.catalog:
            raise UserError("give --catalog ROOT (or set CURATE_CATALOG)")
        render(query(args.catalog, args.query), args.format, args.out, args.max_rows)

    p.set_defaults(run=run)


@command
def demo(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="the README's main job: demo pool → catalog, with a summary",
                       description="Generate the demo pool (once) under OUT/demo_pool, run build-lvd on it into "
                       "OUT/catalog with the shipped demo backbone, and print where to look.")
    p.add_argument("out", nargs="?", default="demo_out")
    p.add_argument("--n", type=int, default=10_000, help="pool images (default 10000)")

    def run(args: argparse.Namespace) -> None:
        from pipelines.demo.job import run_demo

        run_demo(args.out, n=args.n)

    p.set_defaults(run=run)


@command
def jobs(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    add_jobs_command(sub, common)


def _chosen(argv: Sequence[str]) -> str | None:
    names = {c.command for c in STAGE_COMMANDS} | set(COMMANDS) | {"explore"}
    return next((a for a in argv if a in names), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the command named in ``argv`` (all, when None) gets its settings listed in its help."""
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="curate", parents=[common],
        description="Curate a raw image pool into a balanced, diverse training set (DINOv3-style) "
        "and pretrain a ViT on it. Every stage reads and writes a Parquet catalog.",
        epilog="Threads: curate sets torch's, OpenMP/BLAS's and faiss's thread counts (and OMP_NUM_THREADS, "
        "MKL_NUM_THREADS, OPENBLAS_NUM_THREADS) to the CPUs the process may use; --threads N or "
        "CURATE_THREADS=N overrides that count.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv) if argv is not None else None
    for stage_command in STAGE_COMMANDS:
        add_stage_command(sub, stage_command, common, detailed=argv is None or stage_command.command == chosen)
    add_explore_command(sub, common, detailed=argv is None or chosen == "explore")
    for add in COMMANDS.values():
        add(sub, common)
    return parser


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests redirect it per call)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the current stderr is used instead
        pass


def configure_logging(verbose: bool, quiet: bool) -> None:
    """One handler on the ``curate`` logger (every room logs below it): info lines plain, warnings marked."""
    logger = logging.getLogger("curate")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _CurrentStderr)]
    handler = _CurrentStderr()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # before the parser imports a stage (and with it torch, faiss): OpenMP reads its settings at load
        configure_threads()
    except UserError as e:
        print(f"curate: error: {e}", file=sys.stderr)
        return 2
    args = build_parser(argv).parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        if args.threads is not None:  # through the environment, so the Ray workers started later inherit it
            os.environ[OVERRIDE_ENV] = str(args.threads)
            configure_threads()
        if not maybe_submit(args, argv):  # an http:// --address runs the command as a Ray job
            return int(args.run(args) or 0)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"curate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"curate {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
