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
