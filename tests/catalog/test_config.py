from dataclasses import dataclass, field
from typing import Literal

import pytest

from catalog.config import ConfigError, load_config, to_dict


@dataclass(frozen=True)
class Inner:
    k: int = 10
    metric: Literal["l2", "cosine"] = "l2"


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    lr: float = 1e-3
    levels: list[int] = field(default_factory=lambda: [4, 2])
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] | None = None


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from-file\ninner:\n  k: 7\nlr: 1e-5\n")
    cfg = load_config(Outer, str(path), ["inner.metric=cosine", "levels=[8, 4, 2]", "weights={a: 1, b: 0.5}"])
    assert cfg == Outer(name="from-file", lr=1e-5, levels=[8, 4, 2], inner=Inner(7, "cosine"),
                        weights={"a": 1.0, "b": 0.5})
    assert to_dict(cfg)["inner"] == {"k": 7, "metric": "cosine"}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("inner.kk=3", "unknown config key 'inner.kk'"),
        ("inner.k=three", "inner.k: expected an integer"),
        ("inner.metric=dot", "inner.metric: must be one of"),
        ("levels=[1, x]", "levels[1]: expected an integer"),
        ("lr=true", "lr: expected a number"),
        ("nonsense", "must look like key.sub=value"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_config(Outer, None, [override])


def test_file_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Outer, str(path))


def _write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_base_include_chains_relative_to_the_including_file_and_overrides_apply_last(tmp_path):
    _write(tmp_path / "bases" / "root.yaml", "name: root\nlr: 1e-3\nlevels: [1, 2, 3]\ninner: {k: 1, metric: cosine}\n")
    _write(tmp_path / "bases" / "mid.yaml", "base: root.yaml\nname: mid\ninner: {k: 2}\n")
    leaf = _write(tmp_path / "leaf.yaml", "base: bases/mid.yaml\nlevels: [9]\n")
    cfg = load_config(Outer, leaf, ["inner.k=3"])
    # mappings merge key by key (metric kept from root), lists replace, the nearer file wins, overrides last
    assert cfg == Outer(name="mid", lr=1e-3, levels=[9], inner=Inner(3, "cosine"))
    assert load_config(Outer, leaf).inner == Inner(2, "cosine")


def test_base_include_on_an_fsspec_url():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/cfgtest/base.yaml", b"name: from-base\nlr: 0.5\n")
    fs.pipe("/cfgtest/stage/top.yaml", b"base: ../base.yaml\nlr: 0.25\n")
    assert load_config(Outer, "memory://cfgtest/stage/top.yaml") == Outer(name="from-base", lr=0.25)


def test_base_include_cycle_and_missing_base_are_config_errors(tmp_path):
    _write(tmp_path / "a.yaml", "base: sub/b.yaml\nname: a\n")
    _write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(Outer, str(tmp_path / "a.yaml"))
    _write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml \(the base of .*c\.yaml\) does not exist"):
        load_config(Outer, str(tmp_path / "c.yaml"))
    _write(tmp_path / "d.yaml", "base: [x.yaml]\n")
    with pytest.raises(ConfigError, match="base must name another YAML file"):
        load_config(Outer, str(tmp_path / "d.yaml"))
