"""Part, seed and table names are one safe folder name, checked where they enter: a name can never
reach outside the catalog (``curate sample --set part=../../X`` once deleted ``X``)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from catalog.config import ConfigError, load_config
from catalog.names import MAX_LENGTH, check_name, safe_name
from catalog.shards import write_shards
from pipelines.seeds import SeedsConfig, resolve_seed
from pipelines.stages.mix import MixConfig
from tests.helpers import run_cli
from tests.train_helpers import TINY
from training.train.config import load_train_config

BAD = ["", ".", "..", "../x", "../../X", "a/b", "/abs", "_hidden", ".hidden", "-dash", "a b", "a'b", 'a"b',
       "a;b", "x\x00y", "é", "a\\b", "a" * (MAX_LENGTH + 1), 3, None]
GOOD = ["lvd", "imagenet1k", "seed_demo", "part-2.v1", "A", "a" * MAX_LENGTH]


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_unsafe_names_are_refused_with_the_rule(value):
    with pytest.raises(ConfigError, match="part: .* not a valid name.*A-Z a-z 0-9"):
        check_name(value, "part")


@pytest.mark.parametrize("value", GOOD)
def test_safe_names_pass_unchanged(value):
    assert check_name(value, "part") == value


@pytest.mark.parametrize("text", ["my seed (1)", "../..", "", "ümlaut", "_x", "a" * 300])
def test_safe_name_makes_a_valid_name_from_any_text(text):
    assert check_name(safe_name(text, "seed"), "seed")


def _sentinel(tmp_path) -> tuple[str, str]:
    """A catalog root and a folder beside it that ``<root>/curated/../../X`` names."""
    root = str(tmp_path / "cat")
    outside = tmp_path / "X"
    outside.mkdir()
    (outside / "keep.txt").write_text("must survive")
    return root, str(outside)


def _files(folder: str) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(folder) for f in files}


def test_sample_part_outside_the_catalog_is_refused_before_anything_is_deleted(tmp_path):
    root, outside = _sentinel(tmp_path)
    write_shards(root, "clusters", "u", pa.table({"image_id": pa.array(range(20), pa.int64()),
                                                  "l1": [i % 4 for i in range(20)], "l2": [i % 2 for i in range(20)],
                                                  "distance": [0.5] * 20}))
    before = _files(outside)
    done = run_cli(["sample", "--catalog", root, "--target-size", "5", "--set", "part=../../X"])
    assert done.returncode == 2 and "not a valid name" in done.stderr, done.stderr
    assert _files(outside) == before and (tmp_path / "X" / "keep.txt").read_text() == "must survive"
    assert not os.path.exists(os.path.join(root, "curated"))


def test_pack_part_outside_the_catalog_is_refused_and_writes_nothing(tmp_path):
    root, outside = _sentinel(tmp_path)
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    write_shards(root, "curated/../../X", "u", pa.table({"image_id": [1], "uri": [str(image)]}))  # a part there
    before = _files(outside)
    done = run_cli(["pack", "--catalog", root, "--part", "../../X"])
    assert done.returncode == 2 and "not a valid name" in done.stderr, done.stderr
    assert _files(outside) == before and not os.path.exists(os.path.join(root, "packed"))


@pytest.mark.parametrize("overrides", [
    ['parts={"../x": {source: pool}}'],
    ['parts={"lvd": {source: "retrieved:../../x"}}'],
    ["homogeneous_part=../in"],
])
def test_mix_names_are_checked_at_config_load(overrides):
    with pytest.raises(ConfigError, match="not a valid name"):
        load_config(MixConfig, None, overrides)


def test_seed_names_are_checked_and_path_seeds_get_a_valid_name(tmp_path):
    with pytest.raises(ConfigError, match="seed: '../up' is not a valid name"):
        load_config(SeedsConfig, None, ['seeds={"../up": {images: /x}}'])
    folder = tmp_path / "my seed (v2)"
    folder.mkdir()
    name, spec = resolve_seed(str(folder), str(tmp_path / "cat"), SeedsConfig())
    assert check_name(name, "seed") == name and name.startswith("my_seed_v2_-") and spec.images == str(folder)


def test_training_parts_are_checked_at_config_load():
    with pytest.raises(ConfigError, match="data part: '../../etc' is not a valid name"):
        load_train_config(TINY, ["data.parts=[shapes_a, ../../etc]"])
