"""`curate ablate` on the demo catalog: the mechanics of the comparison, not a particular winner.

Every arm sees the same number of images, the runs of one seed differ only by their data, the mix
arm's homogeneous steps are the loader's, a finished ablation is not redone and a killed one
resumes its unfinished arm only.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

from catalog.config import to_dict
from catalog.manifest import list_manifests
from catalog.sql import query
from pipelines.ablate.arms import parts_in_place
from pipelines.ablate.runs import SCORES_FILE, run_dir
from tests.helpers import kill_when, run_cli
from training.data.mixing import step_kind
from training.train.checkpoint import latest_checkpoint
from training.train.config import load_train_config
from training.train.run_state import read_metrics

DEMO_CONFIG = "training/configs/demo_cpu.yaml"
ARMS = ("raw", "clustering", "retrieval", "mix")


@pytest.fixture(scope="module")
def demo_layout(demo_pool, lvd_catalog, tmp_path_factory) -> str:
    """``<dir>/catalog`` (a copy of the LVD catalog) beside ``<dir>/demo_pool``, as `curate demo` lays them out."""
    base = tmp_path_factory.mktemp("ablate")
    shutil.copytree(lvd_catalog, base / "catalog")
    shutil.copytree(demo_pool, base / "demo_pool", symlinks=True)
    return str(base)


@pytest.fixture(scope="module")
def quick(demo_layout):
    """`curate ablate --quick`, SIGKILLed once its second arm has a checkpoint, then run again to the end.

    Returns (catalog, the finishing run's stdout, raw's scores.json as it was at the kill)."""
    root = os.path.join(demo_layout, "catalog")
    args = ["ablate", "--catalog", root, "--config", DEMO_CONFIG, "--quick"]
    raw, clustering = run_dir(root, "quick", "raw", 0), run_dir(root, "quick", "clustering", 0)
    kill_when(args, lambda: latest_checkpoint(os.path.join(clustering, "ckpt")) is not None, timeout=900)
    assert os.path.exists(os.path.join(raw, SCORES_FILE)) and not os.path.exists(os.path.join(clustering, SCORES_FILE))
    raw_scores = _text(raw, SCORES_FILE)
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, result.stdout, raw_scores


def _text(*parts: str) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read()


def _train_manifests(run: str) -> list[dict]:
    return [m for m in list_manifests(run) if m["stage"] == "train"]


def _finished(run: str) -> dict:
    """The one train manifest of ``run`` that finished (a killed invocation leaves another)."""
    [manifest] = [m for m in _train_manifests(run) if m["status"] == "ok"]
    return manifest


@pytest.mark.slow
def test_quick_ablation_writes_a_table_of_every_arm(quick):
    root, out, _ = quick
    folder = os.path.join(root, "ablations", "quick")
    summary = json.loads(_text(folder, "results.json"))
    assert summary["arms"] == ["untrained", *ARMS] and summary["untrained"]
    assert summary["metrics"] == ["knn", "knn_head", "knn_tail", "linear_probe", "instance_recall_at_1",
                                  "instance_map", "dense_miou"]
    for arm in summary["arms"]:
        scores = json.loads(_text(run_dir(root, "quick", arm, 0), SCORES_FILE))
        for metric in summary["metrics"]:
            cell = summary["table"][arm][metric]
            assert cell["values"] == [scores["scores"][metric]] and cell["std"] is None  # one seed: no spread
            assert 0.0 <= cell["mean"] <= 1.0
    table = _text(folder, "results.md")
    assert table in out  # printed as written
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:7]] == ["untrained", *ARMS]
    # the reference row: the teacher before step 0, trained on nothing, every score its own
    untrained = summary["mechanics"]["untrained"]
    assert untrained["steps"] == [0] and untrained["images_seen"] == [0] and untrained["parts"] == []
    assert summary["table"]["untrained"] != summary["table"]["raw"]
    with Image.open(os.path.join(folder, "results.png")) as png:
        assert png.format == "PNG" and png.size[0] > 400
    listing = run_cli(["inspect", root])
    assert listing.returncode == 0 and "ablation quick: 4 arms x 1 seed, 6 steps" in listing.stdout


@pytest.mark.slow
def test_every_arm_sees_the_same_images_and_differs_only_by_data(quick):
    root, _, _ = quick
    configs, seen = {}, {}
    for arm in ARMS:
        run = run_dir(root, "quick", arm, 0)
        configs[arm] = to_dict(load_train_config(os.path.join(run, "config.yaml")))
        seen[arm] = _finished(run)["rows"]["images_seen"]
    assert len(set(seen.values())) == 1 and seen["raw"] == 6 * configs["raw"]["optim"]["batch_size_per_rank"]
    shared = {arm: {k: v for k, v in c.items() if k not in ("data", "output_dir")} for arm, c in configs.items()}
    assert all(shared[arm] == shared["raw"] for arm in ARMS)
    assert {arm: c["data"]["parts"] for arm, c in configs.items()} == {
        "raw": ["pool"], "clustering": ["lvd"], "retrieval": ["retrieved-demo"],
        "mix": ["labelled", "lvd", "retrieved-demo"]}
    # raw is the deduplicated pool; retrieval is exactly the retrieved images of the demo seed
    kept = query(root, "SELECT count(*) FROM pool WHERE status = 'ok' AND image_id NOT IN "
                       "(SELECT image_id FROM duplicates)").column(0)[0].as_py()
    assert query(root, "SELECT count(*) FROM curated_pool").column(0)[0].as_py() == kept
    retrieved = query(root, "SELECT count(DISTINCT image_id) FROM retrieved WHERE seed = 'demo'").column(0)[0].as_py()
    assert query(root, "SELECT count(*) FROM \"curated_retrieved-demo\"").column(0)[0].as_py() == retrieved > 0
    assert not os.path.exists(os.path.join(root, "_mix.json"))  # the arms' parts leave the catalog's mix alone


@pytest.mark.slow
def test_mix_arm_counts_its_homogeneous_steps_from_the_loader(quick):
    root, _, _ = quick
    run = run_dir(root, "quick", "mix", 0)
    scores = json.loads(_text(run, SCORES_FILE))
    config = load_train_config(os.path.join(run, "config.yaml"))
    loader_flags = [m["homogeneous"] for m in read_metrics(run)]
    expected = [step_kind(config.seed, s, 0.1) for s in range(6)]  # the sampler's own rule, recomputed
    assert loader_flags == expected and sum(expected) >= 1
    assert scores["homogeneous_steps"] == sum(expected)
    assert _finished(run)["notes"]["homogeneous_steps_this_run"] == sum(expected)
    summary = json.loads(_text(root, "ablations", "quick", "results.json"))
    assert summary["mechanics"]["mix"]["homogeneous_share"] == pytest.approx(sum(expected) / 6)
    assert summary["mechanics"]["raw"]["homogeneous_share"] is None


@pytest.mark.slow
def test_a_finished_ablation_is_not_redone_and_a_changed_one_is_refused(quick):
    root, _, _ = quick
    again = run_cli(["ablate", "--catalog", root, "--config", DEMO_CONFIG, "--quick"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == len(ARMS)
    assert all(len([m for m in _train_manifests(run_dir(root, "quick", arm, 0)) if m["status"] == "ok"]) == 1
               for arm in ARMS)
    changed = run_cli(["ablate", "--catalog", root, "--config", DEMO_CONFIG, "--quick", "--set", "steps=7"])
    assert changed.returncode == 2 and "was started with another ablation config" in changed.stderr


@pytest.mark.slow
def test_a_killed_ablation_resumes_the_unfinished_arm_only(quick):
    root, out, raw_scores = quick  # killed during its clustering arm, then run again
    raw, clustering = run_dir(root, "quick", "raw", 0), run_dir(root, "quick", "clustering", 0)
    assert "raw seed 0: finished earlier" in out and "clustering seed 0: finished earlier" not in out
    assert len(_train_manifests(raw)) == 1 and _text(raw, SCORES_FILE) == raw_scores
    assert _finished(clustering)["notes"]["resumed_from"] >= 2  # from its checkpoint, not from scratch
    assert [m["step"] for m in read_metrics(clustering)] == list(range(6))
    assert _finished(clustering)["rows"]["images_seen"] == _finished(raw)["rows"]["images_seen"]


def test_an_ablation_rebuilds_its_parts_after_another_replaced_them(quick):
    root, _, _ = quick
    other = ["ablate", "--catalog", root, "--config", DEMO_CONFIG, "--quick", "--name", "other", "--only", "prepare",
             "--set", "arms={lvd-only: {parts: {lvd: {source: lvd}}}}"]
    assert run_cli(other).returncode == 0
    sizes = json.loads(_text(root, "ablations", "quick", "plan.json"))["parts"]
    assert not parts_in_place(root, sizes)  # the other ablation's parts replaced the quick one's
    again = run_cli(["ablate", "--catalog", root, "--config", DEMO_CONFIG, "--quick", "--only", "prepare"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "building them again" in again.stdout and parts_in_place(root, sizes)
