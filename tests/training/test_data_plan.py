"""How a run's parts and mixing come from ``_mix.json`` and the ``data.*`` keys that override it."""

from __future__ import annotations

import pytest

from catalog.mix import TrainingMix, write_mix
from training.train.config import DataConfig
from training.train.data import DEFAULT_P_HOMOGENEOUS, plan_data

MIX = TrainingMix({"imagenet1k": 10, "lvd": 30, "retrieval": 20},
                  {"imagenet1k": 10.0, "lvd": 30.0, "retrieval": 2.0}, "imagenet1k", 0.25)


@pytest.fixture
def root(tmp_path) -> str:
    root = f"memory://plan-{tmp_path.name}"
    write_mix(root, MIX)
    return root


def _plan(root: str, **keys):
    plan = plan_data(DataConfig(catalog_root=root, **keys))
    return plan.parts, plan.weights, plan.homogeneous_part, plan.p_homogeneous


def test_the_catalog_root_alone_trains_on_the_mix(root):
    # The homogeneous part's own weight is not a mixing weight: it only fills homogeneous steps.
    assert _plan(root) == (["imagenet1k", "lvd", "retrieval"], {"lvd": 30.0, "retrieval": 2.0}, "imagenet1k", 0.25)
    assert plan_data(DataConfig(catalog_root=root)).recorded == MIX


def test_each_key_that_is_set_replaces_the_mix_value(root):
    assert _plan(root, weights={"lvd": 1.0, "retrieval": 1.0})[1] == {"lvd": 1.0, "retrieval": 1.0}
    assert _plan(root, p_homogeneous=0.5)[3] == 0.5
    assert _plan(root, homogeneous_part="") == (["imagenet1k", "lvd", "retrieval"],
                                                {"imagenet1k": 10.0, "lvd": 30.0, "retrieval": 2.0}, None, 0.0)
    # Another homogeneous part than the mix's: the mix's probability was for its own part.
    assert _plan(root, homogeneous_part="retrieval")[1:] == ({"imagenet1k": 10.0, "lvd": 30.0}, "retrieval",
                                                             DEFAULT_P_HOMOGENEOUS)


def test_listed_parts_keep_the_mix_weights_and_homogeneous_part_of_those_parts_only(root):
    assert _plan(root, parts=["lvd", "retrieval"]) == (["lvd", "retrieval"], {"lvd": 30.0, "retrieval": 2.0}, None, 0.0)
    assert _plan(root, parts=["lvd", "imagenet1k"]) == (["lvd", "imagenet1k"], {"lvd": 30.0}, "imagenet1k", 0.25)
    with pytest.raises(ValueError, match=r"no weight for parts \['pool'\]"):
        plan_data(DataConfig(catalog_root=root, parts=["lvd", "pool"]))
    assert _plan(root, parts=["lvd", "pool"], weights={"lvd": 1.0, "pool": 1.0})[1] == {"lvd": 1.0, "pool": 1.0}


def test_without_a_mix_the_config_must_name_the_parts(tmp_path):
    root = str(tmp_path / "cat")
    with pytest.raises(ValueError, match="no training mix"):
        plan_data(DataConfig(catalog_root=root))
    assert _plan(root, parts=["a", "b"]) == (["a", "b"], None, None, 0.0)
    assert _plan(root, parts=["a", "b"], homogeneous_part="b")[2:] == ("b", DEFAULT_P_HOMOGENEOUS)
    with pytest.raises(ValueError, match="catalog_root"):
        plan_data(DataConfig())
