"""The stage commands of ``curate`` as one table: each row names a stage, its own flags (each one a config
key) and how its result is printed; one function builds every such subcommand and one runs it.

Nothing here imports a stage module until its command runs (or shows its ``--help``, which lists the
stage's settings and their defaults from the config dataclass), so ``curate sql`` starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.executors import EXECUTORS

STAGE_NOTE = ("Every setting is a config key: --set KEY=VALUE (repeatable, dotted for nested keys), after "
              "--config FILE.yaml; the flags above are shortcuts for the keys they name. A finished stage "
              "is not repeated; a killed one resumes; changed inputs rerun it; changed settings need --overwrite.")


@dataclass(frozen=True)
class Flag:
    """A command-line shortcut for one config key."""

    name: str  # "--target-size", or a positional name
    key: str  # the config key it sets ("target_size", "sample.target_size")
    help: str
    type: Callable[[str], Any] = str
    required: bool = False
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Preview:
    """``--plan``: print what the stage would do from sizes alone instead of running it (no catalog,
    no data, no Ray). The config is loaded as for a run, so its flags and --set keys shape the plan."""

    help: str
    sizes: tuple[Flag, ...]  # every one required with --plan; ``key`` is the render's keyword
    render: str  # "module:function" (config, **sizes) -> text, imported only with --plan


@dataclass(frozen=True)
class StageCommand:
    command: str
    config: str  # "module:ConfigClass", imported only to describe or run
    help: str
    description: str
    reads: str
    writes: str
    flags: tuple[Flag, ...]
    result: Callable[[Any, dict[str, Any]], str]  # (StageResult or build-lvd results, flag values + catalog) -> lines
    overwrite: bool = True
    preview: Preview | None = None


def _ingest(r: Any, _: dict[str, Any]) -> str:
    from pipelines.cli.report_text import skipped_text

    s = r.summary
    removed = f", {s['removed']} removed from the source" if s.get("removed") else ""
    return (f"pool: {s['in']} files, {s['out']} usable, {s['errored']} in errors{removed} ({r.items_run} processed "
            f"in this run); {skipped_text(s.get('skipped_by_extension', {}))}")


def _embed(r: Any, _: dict[str, Any]) -> str:
    return (f"embeddings: {r.rows_run.get('embeddings', 0)} images embedded in this run, "
            f"{r.rows_run.get('errors', 0)} failed to decode")


def _filter(r: Any, _: dict[str, Any]) -> str:
    removed = r.summary["removed"]
    detail = ", ".join(f"{k}={v}" for k, v in removed.items()) or "no rule set or none matched"
    return f"filtered: {sum(removed.values())} of {r.summary['in']} usable images ({detail})"


def _dedup(r: Any, flags: dict[str, Any]) -> str:
    from pipelines.cli.report_text import dedup_text

    graph = r.summary.get("copy_graph")
    searched = (f"\n  copy graph: searched {graph['searched']} of {graph['images']} images (new, changed, or in a "
                "copy group that lost one; the others kept their groups from the last run)"
                if graph and graph["searched"] < graph["images"] else "")
    return dedup_text(flags["catalog"]) + searched


def _cluster(r: Any, _: dict[str, Any]) -> str:
    drift = r.summary.get("drift")
    assigned = (f"; {drift['new']} new images assigned, {drift['share']:.1%} of them beyond the clustered "
                f"images' 99th-percentile distance (reports/cluster/drift.json)") if drift else ""
    return (f"clusters per level (l1 finest): {r.summary['levels']} ({'already done' if r.skipped else 'done'})"
            f"{assigned}")


def _sample(r: Any, _: dict[str, Any]) -> str:
    part = r.run.split("-", 1)[1]
    diff = r.summary.get("diff")
    changed = (f"; kept {diff['kept']} of its earlier images ({diff['kept_share']:.0%}), {diff['added']} added, "
               f"{diff['removed']} removed (reports/{part}/diff.json)") if diff else ""
    return f"curated/{part}: {r.summary['out']} of {r.summary['in']} images{changed}"


def _retrieve(r: Any, _: dict[str, Any]) -> str:
    s = r.summary
    fallback = f", {s['fallback_from']} mode found nothing" if s.get("fallback_from") else ""
    return (f"seed {s['seed']} ({s['seed_images']} images, {s['mode']} mode{fallback}): {s['retrieved']} pool "
            f"images retrieved; report: {s['report']}")


def _mix(r: Any, _: dict[str, Any]) -> str:
    s = r.summary
    lines = [f"{name:>20}: {size:>9} images, weight {s['weights'][name]:g}" for name, size in s["parts"].items()]
    if s["homogeneous_part"]:
        lines.append(f"homogeneous batches from {s['homogeneous_part']} with p={s['p_homogeneous']}")
    return "\n".join(lines)


def _pack(r: Any, _: dict[str, Any]) -> str:
    part = r.run.split("-", 1)[1]
    return f"packed/{part}/shards: {r.summary['packed']} images, {r.summary['unreadable']} unreadable"


def _build_lvd(results: dict[str, Any], flags: dict[str, Any]) -> str:
    from pipelines.cli.report_text import dedup_text

    lines = [_ingest(results["ingest"], flags)] if "ingest" in results else []
    if "dedup" in results:
        lines.append(dedup_text(flags["catalog"]))
    sample = results["sample"].summary
    lines.append(f"curated/lvd: {sample['out']} images; report: {', '.join(sample.get('report', []))}")
    return "\n" + "\n".join(lines)


STAGE_COMMANDS: tuple[StageCommand, ...] = (
    StageCommand(
        "ingest", "pipelines.stages.ingest:IngestConfig", "build the pool table from images",
        "List SOURCE (a folder tree, a glob of WebDataset .tar shards, or a Parquet file or glob of them with a "
        "'uri' column or a bytes column), probe every image (full decode), hash it and make its copy descriptor "
        "(gradient histograms and a colour layout, 480 float16). Rerun on a grown folder or glob, it ingests only "
        "the new files (or Parquet rows); a vanished file keeps its pool row as status 'removed', a file "
        "rewritten under the same name (other size or modification time) is the removal of the old version and "
        "a new file.",
        "the files of SOURCE", "pool (every file: status ok|error), errors (reason per unusable file), "
        "copy_descriptors",
        (Flag("source", "source", "folder, .tar glob, .parquet file or glob (local or an fsspec URL)"),), _ingest),
    StageCommand(
        "filter", "pipelines.stages.filter:FilterConfig", "remove low-quality images before clustering",
        "Drop usable pool images by the quality signals ingest measured (every rule off by default): "
        "--set drop_constant=true min_side=200 max_aspect=3 (DataComp's figures) min_sharpness=6 "
        "max_dark_fraction=… max_bright_fraction=… min_colour_entropy=…",
        "pool", "errors (stage filter, reason filtered:<rule>); clustering leaves those images out", (), _filter),
    StageCommand(
        "embed", "pipelines.stages.embed:EmbedConfig", "embed the pool's usable images with an SSL backbone",
        "Decode every usable pool image (Ray CPU tasks, or in-process for small pools) and embed it with the "
        "backbone, loaded once per worker (an actor per GPU, or on CPU). The image size, mean and std come "
        "with the backbone (registry entry or export metadata) unless image_size is set. Rerun after the pool "
        "grew, it embeds only the images of new or rewritten pool shards it has not embedded and drops the "
        "vectors of images no longer in the pool.",
        "pool", "embeddings (float16 vectors; model id, weights sha256 and preprocessing in the file metadata), "
        "errors",
        (Flag("--model", "model", "dinov2_vitl14, dinov3_vitl16, … (training/models/config.py) or curate:PATH "
              "for a backbone exported by `curate export-backbone`"),
         Flag("--weights", "weights", "checkpoint file of the official release (.pth or .safetensors); a registry "
              "name without weights is refused unless --set random_init=true")),
        _embed),
    StageCommand(
        "dedup", "pipelines.stages.dedup:DedupConfig", "remove exact duplicates, near copies and eval-set overlaps",
        "Exact duplicates by sha256; copy detection by a k-NN graph over copy descriptors, each image also searched "
        "mirrored, each candidate pair confirmed by an aligned 32x32 pixel check (--set check_threshold=null turns "
        "it off), then connected components, the largest image of each kept; relative dedup against evaluation "
        "sets (--set eval_sets='{name: folder}'). --set descriptor=torchscript:PATH runs a local TorchScript "
        "copy-detection model such as SSCD (model_size 320, model_dim 512, ImageNet mean/std by default) with a "
        "threshold calibrated on labelled copies (--set calibration_copies=FOLDER of <group>/<image> folders, else "
        "synthetic groups; reports/dedup/calibration.json). A run that would remove more "
        "than max_removed_share (default 0.2) of the pool fails and shows example pairs instead. --set workers=N "
        "searches the k-NN graph on N Ray actors (the same duplicates as one). The copy graph is kept "
        "(_checkpoints/dedup/): rerun on a grown pool, it searches only the new or changed images and the copy "
        "groups that lost one, and a TorchScript model describes only the new or changed images (--overwrite "
        "forgets both).",
        "pool, copy_descriptors (or embeddings)", "duplicates (image_id, kept_id, similarity, reason); "
        "model_copy_descriptors with a TorchScript descriptor; clustering and retrieval leave those images out",
        (), _dedup),
    StageCommand(
        "cluster", "pipelines.stages.cluster:ClusterConfig", "hierarchical k-means with resampling over embeddings",
        "Cluster the catalog's embeddings (or --embeddings X.npy --ids IDS.npy, or a Parquet file with image_id "
        "and embedding columns) into a hierarchy of levels (default: 5 levels scaled from the paper's ratios to "
        "the pool size; level 1 is one k-means while that costs under 1 TFLOP, else pre-clusters each split "
        "in sub-clusters). Checkpointed per level and resampling step. --plan --rows N --dim D prints the "
        "levels a pool of that size gets, with each level's FLOPs, time on this machine and memory, and the "
        "level-1 worker count that fits an 80 GB GPU; it needs no catalog and reads no data. Rerun after the "
        "embeddings grew, it assigns the new images down the existing hierarchy and writes "
        "reports/cluster/drift.json (the share of new images beyond the clustered ones' 99th-percentile "
        "distance, per top cluster); past max_drift (default 0.5), or with --recluster, it clusters again, "
        "starting each level from its old centroids (fresh seeds for the share of the pool they leave far); "
        "--overwrite clusters from scratch.",
        "embeddings, duplicates", "clusters (a cluster id per level, l1 finest), centroids",
        (Flag("--levels", "n_levels", "number of levels (default 5)", int),
         Flag("--embeddings", "embeddings", "bring your own: .npy (with --ids) or .parquet"),
         Flag("--ids", "ids", ".npy of int64 image ids matching --embeddings rows"),
         Flag("--recluster", "recluster", "after the embeddings grew: cluster the whole pool again instead of "
              "assigning the new images down the existing hierarchy", bool)), _cluster,
        preview=Preview("print the levels and cost for --rows x --dim instead of clustering (no data, no Ray)",
                        (Flag("--rows", "rows", "pool size for --plan", int),
                         Flag("--dim", "dim", "embedding dimension for --plan", int)),
                        "pipelines.stages.cluster:plan_text")),
    StageCommand(
        "sample", "pipelines.stages.sample:SampleConfig", "balanced hierarchical sampling into a curated part",
        "Water-fill --target-size over the top-level clusters, then down the hierarchy; pick inside level-1 "
        "clusters at random (or closest/farthest), and write the part's report. Resampled after the clusters "
        "changed (a grown pool), the part keeps its earlier images while their level-1 cluster's budget covers "
        "them, fills or trims each cluster, and writes reports/<part>/diff.json (--set keep_previous=false: "
        "sample afresh).",
        "clusters, pool", "curated/<part> (default lvd: image_id, uri, part, cluster lineage), "
        "reports/<part>/*.png, reports/<part>/diff.json",
        (Flag("--target-size", "target_size", "images in the part", int, required=True),
         Flag("--part", "part", "name of the part (default lvd)")), _sample),
    StageCommand(
        "retrieve", "pipelines.stages.retrieve:RetrieveConfig", "retrieve pool images that look like a seed dataset",
        "Ingest and embed the seed exactly like the pool (under _seeds/<seed>), then take the k nearest pool "
        "images of every seed image (--mode knn) or images from pool clusters holding more than a few seed "
        "images (--mode cluster; needs build-lvd's clusters). auto: k-NN for a large seed, over knn_min_seeds "
        "(1,000,000) images; below that, cluster mode only where the seed images bunch up: level-1 clusters "
        "holding more than min_seed_per_cluster (3) seed images must hold at least half of them, else k-NN. "
        "When cluster mode finds nothing it falls back to k-NN with a warning giving the numbers; an empty "
        "result is a warning. Duplicates are never retrieved. --set workers=N runs the k-NN search on N Ray "
        "actors (the same rows as one). k-NN mode keeps each seed image's 2k nearest pool images: rerun on a "
        "grown pool, it searches only the new images.",
        "embeddings, duplicates, clusters, centroids, the seed", "the seed's rows of retrieved, "
        "reports/retrieve/<seed>.png",
        (Flag("--seed", "seed_set", "a seed name from the seeds config (demo, …) or a path", required=True),
         Flag("--mode", "mode", "auto (default), knn or cluster", choices=("auto", "knn", "cluster")),
         Flag("--k", "k", "neighbours per seed image in knn mode (default 4)", int),
         Flag("--max-per-seed", "max_per_seed", "cap on images retrieved for this seed", int),
         Flag("--min-similarity", "min_similarity", "cosine floor in knn mode", float)), _retrieve),
    StageCommand(
        "mix", "pipelines.stages.mix:MixConfig", "assemble the training mix: curated parts and their weights",
        "Materialise each part (--set parts='{name: {source: pool|lvd|retrieved:<seed>|images:<folder>, "
        "weight: W}}') and record the weights and the homogeneous part for the trainer.",
        "pool, duplicates, curated/lvd, retrieved", "curated/<part> per part, _mix.json", (), _mix),
    StageCommand(
        "pack", "pipelines.stages.pack:PackConfig", "write a curated part as WebDataset shards for fast training reads",
        "Copy the images of curated/<part> into WebDataset tar shards (<key>.jpg when every image is a JPEG, "
        "else <key>.png, lossless; <key>.json with image_id, uri, part and cluster ids; key = image_id as 16 "
        "hex digits, unsigned) with an index of byte ranges; training then reads the shards instead of one "
        "object per image.",
        "curated/<part>", "packed/<part>/shards/*.tar, their index table packed/<part>/index, errors "
        "(unreadable images)",
        (Flag("--part", "part", "the curated part to pack", required=True),
         Flag("--images-per-shard", "images_per_shard", "images per tar shard (default 1000)", int)), _pack),
    StageCommand(
        "build-lvd", "pipelines.build_lvd:BuildLVDConfig",
        "the whole LVD pipeline: ingest → filter → embed → dedup → cluster → sample",
        "Run every stage that is not done yet (the filter only with a rule set, e.g. filter.min_side=200). "
        "Settings are grouped per stage: --set embed.model=dinov3_vitl16 embed.weights=/w/dinov3.pth "
        "cluster.n_levels=4 sample.strategy=random",
        "the files of --source (or an ingested pool)", "everything the stages write, and reports/lvd/*.png",
        (Flag("--source", "ingest.source", "pool to ingest first (folder, tar glob, Parquet); omit if ingested"),
         Flag("--target-size", "sample.target_size", "images in the curated part", int, required=True),
         Flag("--levels", "cluster.n_levels", "hierarchy levels (default 5)", int)), _build_lvd, overwrite=False),
)


def _imported(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def config_class(command: StageCommand) -> type:
    return _imported(command.config)


def describe_settings(cls: type, prefix: str = "") -> list[str]:
    """``key=default`` for every field of a config dataclass, nested sections flattened."""
    lines = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            lines += describe_settings(f.type, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            lines += describe_settings(type(default), f"{prefix}{f.name}.")
        else:
            lines.append(f"  {prefix}{f.name}={default!r}")
    return lines


def add_stage_command(sub: argparse._SubParsersAction, command: StageCommand, common: argparse.ArgumentParser,
                      detailed: bool) -> None:
    """One subcommand from a table row; ``detailed`` adds the settings with their defaults to its help."""
    epilog = f"reads: {command.reads}\nwrites: {command.writes}\n\n{STAGE_NOTE}"
    if detailed:
        epilog += "\n\nsettings (defaults):\n" + "\n".join(describe_settings(config_class(command)))
    p = sub.add_parser(command.command, help=command.help, description=command.description, epilog=epilog,
                       parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in command.flags:
        kwargs: dict[str, Any] = {"help": flag.help, "type": flag.type}
        if flag.type is bool:  # a switch: given sets the key true, absent leaves it to the config
            kwargs = {"help": flag.help, "action": "store_const", "const": True}
        if flag.choices:
            kwargs["choices"] = flag.choices
        if flag.name.startswith("--"):
            p.add_argument(flag.name, dest=_dest(flag), required=flag.required, **kwargs)
        else:
            p.add_argument(_dest(flag), metavar=flag.name.upper(), **kwargs)
    p.add_argument("--catalog", required=command.preview is None,
                   help="catalog root: a folder or an fsspec URL (s3://bucket/cat)")
    add_run_options(p, "start the stage again from scratch: forget its progress and delete what it wrote"
                    if command.overwrite else None)
    if command.preview:
        p.add_argument("--plan", action="store_true", help=command.preview.help)
        for size in command.preview.sizes:
            p.add_argument(size.name, dest=_dest(size), metavar=size.key.upper(), type=size.type, help=size.help)
    p.set_defaults(run=lambda args: run_stage_command(command, args, p))


def add_run_options(p: argparse.ArgumentParser, overwrite_help: str | None) -> None:
    """The options of every command that runs stages: --config, --set, --overwrite (when ``overwrite_help``
    is given), --executor and --address."""
    p.add_argument("--config", help="YAML file with this command's settings (keys as in --set)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set k=32 threshold=0.9")
    if overwrite_help:
        p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="where units run: ray, local (this process), or auto (default: local for small work "
                   "without a cluster)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on: ray://… or auto joins it; http://HEAD:8265 submits the command "
                   "as a Ray job (default: CURATE_RAY_ADDRESS, else Ray in-process when needed)")


def _preview(preview: Preview, config: Any, args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    sizes = {size.key: getattr(args, _dest(size)) for size in preview.sizes}
    missing = [size.name for size in preview.sizes if sizes[size.key] is None]
    if missing:
        parser.error(f"--plan needs {' and '.join(missing)}")
    return _imported(preview.render)(config, **sizes)


def _dest(flag: Flag) -> str:
    return "flag_" + flag.key.replace(".", "__")


def run_stage_command(command: StageCommand, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Load the config (defaults, YAML, --set, then the flags), run the stage (or, with --plan, print its
    preview), print its result."""
    from catalog.config import load_config

    values = {f.key: getattr(args, _dest(f)) for f in command.flags}
    # JSON is YAML: a flag's value keeps its type (a folder named 2024 stays a string)
    overrides = [*args.set, *(f"{k}={json.dumps(v)}" for k, v in values.items() if v is not None)]
    config = load_config(config_class(command), args.config, overrides)
    if command.preview and args.plan:
        print(_preview(command.preview, config, args, parser))
        return
    if not args.catalog:
        parser.error("--catalog is required (or --plan to preview the run)")
    if command.command == "build-lvd":
        from pipelines.build_lvd import build_lvd

        result: Any = build_lvd(args.catalog, config, address=args.address, executor=args.executor)
    else:
        from pipelines.stage import run_stage

        result = run_stage(command.command, args.catalog, config, overwrite=args.overwrite,
                           executor=args.executor, address=args.address)
    print(command.result(result, {**values, "catalog": args.catalog}))
