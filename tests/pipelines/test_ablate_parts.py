"""The ablation's pieces that need no training: the arms' config, their data overrides, the shortened
schedule, and the table (mean ± std against numpy, Markdown, the chart)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from catalog.config import ConfigError, load_config
from pipelines.ablate.arms import data_overrides, part_sources
from pipelines.ablate.config import AblationConfig, ArmSpec
from pipelines.ablate.runs import shortened
from pipelines.ablate.table import bar_chart, markdown, summarise
from pipelines.stages.mix import PartSpec
from training.train.config import load_train_config
from training.train.data import plan_data
from training.train.schedules import Schedules

DEMO = "training/configs/demo_cpu.yaml"


def test_default_arms_are_the_papers_four():
    config = AblationConfig()
    assert list(config.arms) == ["raw", "clustering", "retrieval", "mix"] and config.seeds == [0, 1, 2]
    mix = config.arms["mix"]
    assert mix.homogeneous_part == "labelled" and mix.p_homogeneous == 0.1
    assert mix.parts["labelled"].source == "images:{catalog}/demo_pool/seed"


def test_arms_from_yaml_and_their_mistakes():
    config = load_config(AblationConfig, None, ["arms={a: {parts: {pool: {source: pool}}}, b: {from_mix: true}}",
                                                "seeds=[3, 4]"])
    assert config.arms["b"].from_mix and config.arms["a"].parts == {"pool": PartSpec("pool")}
    with pytest.raises((ValueError, ConfigError), match="one of the two"):
        ArmSpec()
    with pytest.raises((ValueError, ConfigError), match="not one of the arm's parts"):
        ArmSpec({"pool": PartSpec("pool")}, homogeneous_part="labelled")
    with pytest.raises((ValueError, ConfigError), match="distinct"):
        AblationConfig(seeds=[1, 1])
    with pytest.raises((ValueError, ConfigError), match="not a valid name"):
        AblationConfig(arms={"../x": ArmSpec({"pool": PartSpec("pool")})})


def test_one_part_name_with_two_sources_is_refused():
    arms = {"a": ArmSpec({"p": PartSpec("pool")}), "b": ArmSpec({"p": PartSpec("lvd")})}
    with pytest.raises(ValueError, match="give them different names"):
        part_sources(arms, "/x/catalog")
    filled = part_sources({"a": ArmSpec({"s": PartSpec("images:{catalog}/demo_pool/seed")})}, "/x/catalog")
    assert filled == {"s": "images:/x/demo_pool/seed"}


def test_data_overrides_make_the_trainer_read_exactly_the_arms_parts(tmp_path):
    spec = ArmSpec({"lvd": PartSpec("lvd"), "ret": PartSpec("retrieved:demo", weight=2.0),
                    "labelled": PartSpec("images:x")}, homogeneous_part="labelled", p_homogeneous=0.25)
    root = str(tmp_path / "cat")
    config = load_train_config(DEMO, data_overrides(root, spec, {"lvd": 300, "ret": 40, "labelled": 10}))
    plan = plan_data(config.data)  # no _mix.json in the catalog: the overrides alone decide
    assert plan.parts == ["labelled", "lvd", "ret"] and plan.weights == {"lvd": 300.0, "ret": 2.0}
    assert plan.homogeneous_part == "labelled" and plan.p_homogeneous == 0.25
    plain = load_train_config(DEMO, data_overrides(root, ArmSpec({"pool": PartSpec("pool")}), {"pool": 9}))
    assert plan_data(plain.data).homogeneous_part is None and plain.data.p_homogeneous == 0.0
    from_mix = load_train_config(DEMO, data_overrides(root, ArmSpec(from_mix=True), {}))
    assert from_mix.data.parts == [] and from_mix.data.weights is None and from_mix.data.homogeneous_part is None


def test_a_shortened_schedule_keeps_every_span_in_proportion():
    full = load_train_config(DEMO)
    short = load_train_config(DEMO, shortened(full, 150))
    assert short.optim.iterations == 150 and short.checkpoint.period == 50
    assert short.optim.lr.warmup_iterations == 15 and short.optim.teacher_temp.warmup_iterations == 50
    assert short.optim.freeze_last_layer_iterations == 10
    long_lr = Schedules(full.optim, 32, full.loss)
    short_lr = Schedules(short.optim, 32, short.loss)
    for frac in (0.0, 0.1, 0.5, 1.0 - 1 / 150):  # the same schedule at the same share of the run
        s = min(int(frac * 150), 149)
        assert short_lr.at(s).lr == pytest.approx(long_lr.at(2 * s).lr, rel=0.02, abs=1e-6)


def _scores(arm: str, seed: int, knn: float, tail: float, homogeneous: int | None) -> dict:
    return {"arm": arm, "seed": seed, "scores": {"knn": knn, "knn_tail": tail}, "steps": 10, "images_seen": 320,
            "homogeneous_steps": homogeneous, "train_seconds": 1.0,
            "plan": {"parts": [arm], "p_homogeneous": 0.1 if homogeneous is not None else 0.0}}


def test_the_table_is_mean_and_sample_std_over_seeds():
    values = {"raw": [0.50, 0.54, 0.52], "lvd": [0.61, 0.58, 0.64]}
    runs = [_scores(arm, s, v, v / 2, 1 if arm == "lvd" else None) for arm, vs in values.items()
            for s, v in enumerate(vs)]
    summary = summarise("t", runs, ["raw", "lvd"], ["knn", "knn_tail"])
    for arm, vs in values.items():
        cell = summary["table"][arm]["knn"]
        assert cell["mean"] == pytest.approx(np.mean(vs)) and cell["std"] == pytest.approx(np.std(vs, ddof=1))
        assert cell["values"] == vs
    assert summary["mechanics"]["lvd"]["homogeneous_share"] == pytest.approx(3 / 30)
    text = markdown({**summary, "part_sizes": {"raw": 900, "lvd": 300}})
    rows = text.splitlines()
    assert rows[0].startswith("| arm | k-NN | k-NN tail |")
    assert rows[3].startswith(f"| lvd | **{100 * np.mean(values['lvd']):.1f} ± {100 * np.std(values['lvd'], ddof=1):.1f}**")
    assert "| 10.0 % (p = 0.1) |" in rows[3] and rows[2].endswith("| 320 | — |")
    assert "raw: raw (900); lvd: lvd (300)" in text
    with Image.open(io.BytesIO(bar_chart(summary))) as png:
        assert png.format == "PNG"
    with pytest.raises(ValueError, match="no finished run"):
        summarise("t", runs, ["raw", "mix"], ["knn"])


def test_arms_are_compared_with_raw_seed_by_seed():
    """The paired difference cancels what a seed shares: lvd is 2 points above raw on every seed, while
    each arm's own spread over seeds (10 points) hides it side by side."""
    raw = [0.40, 0.50, 0.60]
    runs = [_scores("raw", s, v, v, None) for s, v in enumerate(raw)]
    runs += [_scores("lvd", s, v + 0.02, v + [0.01, 0.02, 0.03][s], None) for s, v in enumerate(raw)]
    untrained = [{**_scores("untrained", s, 0.05, 0.05, None), "images_seen": 0} for s in range(3)]
    summary = summarise("t", untrained + runs, ["untrained", "lvd", "raw"], ["knn", "knn_tail"])
    assert summary["baseline"] == "raw" and list(summary["paired"]) == ["lvd"]
    knn, tail = summary["paired"]["lvd"]["knn"], summary["paired"]["lvd"]["knn_tail"]
    assert knn["values"] == pytest.approx([0.02] * 3) and knn["std"] == pytest.approx(0.0, abs=1e-12)
    assert tail["mean"] == pytest.approx(0.02) and tail["std"] == pytest.approx(0.01)
    assert summary["table"]["lvd"]["knn"]["std"] == pytest.approx(0.10)
    text = markdown({**summary, "part_sizes": {}})
    assert "| arm − raw | k-NN | k-NN tail |" in text
    assert "| lvd | **+2.0 ± 0.0** | **+2.0 ± 1.0** |" in text
    # without a raw arm the first trained arm is the baseline, never the untrained row
    no_raw = summarise("t", untrained + [r for r in runs if r["arm"] == "lvd"], ["untrained", "lvd"], ["knn"])
    assert no_raw["baseline"] == "lvd" and no_raw["paired"] == {}
    with pytest.raises(ValueError, match="same seeds"):
        summarise("t", runs[:2] + runs[3:], ["raw", "lvd"], ["knn"])


def test_ablations_on_other_seeds_pool_into_one_table(tmp_path):
    from benchmarks.ablation_seeds import pooled

    runs = [_scores(arm, s, 0.4 + 0.01 * s + (0.03 if arm == "lvd" else 0.0), 0.3 + 0.02 * s, None)
            for arm in ("raw", "lvd") for s in range(6)]

    def results(name: str, seeds: range) -> str:
        """An ablation folder as `curate ablate` leaves it: each run's scores.json, then results.json."""
        mine = [r for r in runs if r["seed"] in seeds]
        for r in mine:
            (tmp_path / name / r["arm"] / f"seed{r['seed']}").mkdir(parents=True)
            (tmp_path / name / r["arm"] / f"seed{r['seed']}" / "scores.json").write_text(json.dumps(r))
        summary = {**summarise(name, mine, ["raw", "lvd"], ["knn", "knn_tail"]), "steps": 10}
        (tmp_path / name / "results.json").write_text(json.dumps(summary))
        return str(tmp_path / name / "results.json")

    first, second = results("a", range(3)), results("b", range(3, 6))
    together = pooled([first, second])
    alone = summarise("t", runs, ["raw", "lvd"], ["knn", "knn_tail"])
    assert together["table"] == alone["table"] and together["paired"] == alone["paired"]
    assert together["paired"]["lvd"]["knn"]["mean"] == pytest.approx(0.03)
    with pytest.raises(ValueError, match="two ablations"):
        pooled([first, results("c", range(2, 6))])
