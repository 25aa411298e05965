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
from training.models.checkpoints import CheckpointError
from pipelines.sql_output import FORMATS, render

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
        from pipelines.demo_pool import generate_demo_pool

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
        from pipelines.ingest import IngestConfig, ingest as run_ingest

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
        from pipelines.embed import EmbedConfig, embed as run_embed

        overrides = list(args.set)
        overrides += [f"model={args.model}"] if args.model else []
        overrides += [f"weights={args.weights}"] if args.weights else []
        config = load_config(EmbedConfig, args.config, overrides)
        rows = run_embed(args.catalog, config, address=args.address, overwrite=args.overwrite)
        print(f"embeddings: {rows['out']} images embedded in this run, {rows['errored']} failed to decode")

    p.set_defaults(run=run)


@command
def inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a catalog's tables and last runs")
    p.add_argument("root")

    def run(args: argparse.Namespace) -> None:
        from pipelines.report_text import inspect_text

        print(inspect_text(args.root))

    p.set_defaults(run=run)


@command
def sql(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sql", help="query a catalog with DuckDB (read-only)",
                       description="Every catalog table is a view under its own name (curated parts as "
                       "curated_<part> and all together as curated). Only queries are allowed.")
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
        from pipelines.demo_job import run_demo

        run_demo(args.out, n=args.n)

    p.set_defaults(run=run)


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
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as e:
        print(f"curate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"curate {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
