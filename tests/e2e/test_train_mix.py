"""The mix seam: `curate mix` then `curate train` with only data.catalog_root trains on the mix."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import yaml

from catalog.manifest import list_manifests
from tests.helpers import run_cli
from tests.train_helpers import TINY
from training.train.config import load_train_config, vit_config
from training.train.data import build_loader
from training.train.run_state import read_metrics

STEPS = 40
P_HOMOGENEOUS = 0.25
WEIGHTS = {"lvd": 3.0, "pool": 1.0}


@pytest.mark.slow
def test_train_with_only_the_catalog_root_follows_the_mix(demo_pool, lvd_catalog, tmp_path):
    root = str(tmp_path / "cat")
    shutil.copytree(lvd_catalog, root)
    seeds = os.path.join(demo_pool, "seed")
    parts = (f"parts={{lvd: {{source: lvd, weight: {WEIGHTS['lvd']}}}, pool: {{source: pool, weight: {WEIGHTS['pool']}}}, "
             f"imagenet1k: {{source: 'images:{seeds}'}}}}")
    result = run_cli(["mix", "--catalog", root, "--set", parts, "homogeneous_part=imagenet1k",
                      f"p_homogeneous={P_HOMOGENEOUS}"])
    assert result.returncode == 0, result.stderr

    # The tiny recipe without its data section: nothing but the catalog root says what to read.
    config_file = tmp_path / "tiny_no_data.yaml"
    recipe = yaml.safe_load(Path(TINY).read_text())
    del recipe["data"]
    config_file.write_text(yaml.safe_dump(recipe))
    run = str(tmp_path / "run")
    result = run_cli(["train", "--config", str(config_file), f"data.catalog_root={root}", f"output_dir={run}",
                      f"optim.iterations={STEPS}", f"checkpoint.period={STEPS}"])
    assert result.returncode == 0, result.stderr[-3000:]

    [manifest] = list_manifests(run)
    assert manifest["inputs"]["plan"] == {"parts": ["imagenet1k", "lvd", "pool"], "weights": WEIGHTS,
                                          "homogeneous_part": "imagenet1k", "p_homogeneous": P_HOMOGENEOUS}
    config = load_train_config(os.path.join(run, "config.yaml"))
    assert config.data.parts == [] and config.data.weights is None  # the run's own config named none of it
    batch = config.optim.batch_size_per_rank
    patch = vit_config(config.model).patch_size

    # The run drew what its loader yields: replay the loader of the saved config for the same steps.
    metrics = read_metrics(run)
    batches = list(islice(build_loader(config, 0, 1, patch), STEPS))
    assert [m["homogeneous"] for m in metrics] == [b["homogeneous"] for b in batches]
    drawn = Counter(part for b in batches for part in b["parts"])
    assert manifest["notes"]["images_by_part"] == {p: drawn[p] for p in ("imagenet1k", "lvd", "pool")}
    homogeneous_steps = sum(m["homogeneous"] for m in metrics)
    assert homogeneous_steps > 0 and drawn["imagenet1k"] == batch * homogeneous_steps

    # Over many steps the loader's draws match the mix's share of homogeneous steps and its weights.
    sampler = build_loader(config, 0, 1, patch).sampler
    draws = [sampler.next_step() for _ in range(5000)]
    homogeneous = [d for d in draws if d.homogeneous]
    assert abs(len(homogeneous) / len(draws) - P_HOMOGENEOUS) < 0.02
    assert {p for d in homogeneous for p in d.parts} == {"imagenet1k"}
    mixed = Counter(p for d in draws if not d.homogeneous for p in d.parts)
    assert set(mixed) == {"lvd", "pool"}
    assert abs(mixed["lvd"] / sum(mixed.values()) - WEIGHTS["lvd"] / sum(WEIGHTS.values())) < 0.02
