"""``curate explore CATALOG``: the static site of a catalog, steered like the stage commands (--config, --set,
--overwrite, --executor, --address) since its sprite sheets are a stage (`pipelines.stages.thumbnails`)."""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.cli.stage_commands import STAGE_NOTE, add_run_options, describe_settings

DESCRIPTION = (
    "Write a static site (HTML, CSS, a little JavaScript, no server) that browses the catalog's cluster tree "
    "(every node's sizes in the pool and curated parts, closest-to-centroid and random thumbnails, members, "
    "removed duplicates, neighbours), the duplicate groups, retrievals, errors and stage runs, with a search by "
    "image id or URI substring. Open OUT/index.html from disk, serve OUT with any static server, or upload it "
    "to a bucket. The thumbnails are the `thumbnails` stage, run on the site folder: built once, resumed "
    "after a kill, in-process for small sites and on Ray for large ones; caps per page: --set members=48 "
    "central=12 deepest_level=2 ….")
READS = "pool, clusters, centroids, curated/*, duplicates, retrieved, errors, _manifests of CATALOG"
WRITES = ("OUT: index.html, app.js, style.css, data/ (one file per page), thumbs/ (sprite sheets), and the "
          "thumbnails stage's _shown, _thumbs, _ledger, _manifests")


def add_explore_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, detailed: bool) -> None:
    """The subcommand; ``detailed`` lists every setting with its default in its help."""
    epilog = f"reads: {READS}\nwrites: {WRITES}\n\n{STAGE_NOTE}"
    if detailed:
        from pipelines.explore.config import ExploreConfig

        epilog += "\n\nsettings (defaults):\n" + "\n".join(describe_settings(ExploreConfig))
    p = sub.add_parser("explore", parents=[common], help="write a static site to browse a catalog in a web browser",
                       description=DESCRIPTION, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("catalog", help="catalog root: a folder or an fsspec URL")
    p.add_argument("--out", help="site folder (default: CATALOG/reports/explore)")
    p.add_argument("--open", action="store_true", help="open the site in the default web browser when done")
    add_run_options(p, "draw the thumbnails again from scratch: forget their progress and delete the sheets")
    p.set_defaults(run=run_explore)


def run_explore(args: argparse.Namespace) -> None:
    import webbrowser

    from catalog.config import load_config
    from pipelines.explore.config import ExploreConfig
    from pipelines.explore.site import build_site

    out = build_site(args.catalog, args.out, load_config(ExploreConfig, args.config, args.set),
                     overwrite=args.overwrite, executor=args.executor, address=args.address)
    thumbs = out["thumbnails"]
    print(f"site: {out['index']} ({out['node_pages']} cluster pages, {out['images_shown']} images shown, "
          f"{thumbs.items_run} thumbnails built in this run, largest data file {out['largest_data_file']:,} bytes, "
          f"{out['seconds']['total']:.1f}s)")
    failed = thumbs.summary["errored"]
    if failed:
        print(f"warning: {failed} of {out['images_shown']} images shown could not be decoded for thumbnails "
              "(shown as hatched boxes)", file=sys.stderr)
    if args.open:
        webbrowser.open("file://" + os.path.abspath(out["index"]) if "://" not in out["index"] else out["index"])
