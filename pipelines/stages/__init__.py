"""The stages, by name. Each module holds one stage (its config, its `Stage` subclass as ``STAGE``); this
table is how the CLI, ``build-lvd`` and stages that run other stages (a seed set's ingest and embed)
find them, without importing a stage module before it is needed."""

from __future__ import annotations

import importlib

STAGE_MODULES: dict[str, str] = {
    "ingest": "pipelines.stages.ingest",
    "embed": "pipelines.stages.embed",
    "dedup": "pipelines.stages.dedup",
    "cluster": "pipelines.stages.cluster",
    "sample": "pipelines.stages.sample",
    "retrieve": "pipelines.stages.retrieve",
    "mix": "pipelines.stages.mix",
    "pack": "pipelines.stages.pack",
    "thumbnails": "pipelines.stages.thumbnails",  # run by `curate explore`, on the site folder
}


def get_stage(name: str):  # -> pipelines.stage.Stage (not imported here: this module stays light)
    """The stage called ``name``."""
    if name not in STAGE_MODULES:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name]).STAGE
