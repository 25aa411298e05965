"""``_mix.json``: the record `curate mix` writes and the trainer reads, on any store."""

from __future__ import annotations

import json

import pytest

from catalog.mix import MIX_FILE, MixFileError, TrainingMix, read_mix, write_mix
from catalog.paths import join, read_bytes, write_bytes_atomic


@pytest.mark.parametrize("root_kind", ["local", "memory"])
def test_mix_round_trips_in_the_file_form_the_stage_has_always_written(tmp_path, root_kind):
    root = str(tmp_path / "cat") if root_kind == "local" else f"memory://mix-{tmp_path.name}"
    assert read_mix(root) is None
    mix = TrainingMix({"lvd": 30, "imagenet1k": 10}, {"lvd": 30.0, "imagenet1k": 10.0}, "imagenet1k", 0.1)
    write_mix(root, mix)
    assert json.loads(read_bytes(join(root, MIX_FILE))) == {
        "parts": {"lvd": 30, "imagenet1k": 10}, "weights": {"lvd": 30.0, "imagenet1k": 10.0},
        "homogeneous_part": "imagenet1k", "p_homogeneous": 0.1}
    assert read_mix(root) == mix
    none = TrainingMix({"pool": 5}, {"pool": 5.0})
    write_mix(root, none)
    assert json.loads(read_bytes(join(root, MIX_FILE)))["homogeneous_part"] == ""
    assert read_mix(root).homogeneous_part is None


@pytest.mark.parametrize(("doc", "message"), [
    ({"parts": {}}, "at least one part"),
    ({"parts": {"a": -1}}, "non-negative integers"),
    ({"parts": {"a": 2}, "weights": {"b": 1.0}}, "not in the mix"),
    ({"parts": {"a": 2}, "weights": {"a": float("nan")}}, "finite"),
    ({"parts": {"a": 2}, "homogeneous_part": "b", "p_homogeneous": 0.1}, "not among the parts"),
    ({"parts": {"a": 2}, "homogeneous_part": "a", "p_homogeneous": 1.5}, r"\[0, 1\]"),
    ([1, 2], "expected an object"),
])
def test_a_broken_mix_file_is_refused_with_the_reason(tmp_path, doc, message):
    root = str(tmp_path)
    write_bytes_atomic(join(root, MIX_FILE), json.dumps(doc).encode())
    with pytest.raises(MixFileError, match=message):
        read_mix(root)


def test_a_mix_file_that_is_not_json_is_refused(tmp_path):
    write_bytes_atomic(join(str(tmp_path), MIX_FILE), b"{parts: ")
    with pytest.raises(MixFileError, match="not JSON"):
        read_mix(str(tmp_path))
