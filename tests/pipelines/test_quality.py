"""Quality signals at ingest and the filter stage, on a demo pool with planted low-quality images."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from catalog.errors import MissingInputError
from catalog.schemas import POOL, QUALITY_COLUMNS, stamp
from catalog.shards import write_shards
from catalog.sql import query
from curation.quality import RULES, first_failed_rule, laplacian_variance, quality_signals
from pipelines.demo.job import DEMO_SETTINGS
from pipelines.demo.pool import LOW_QUALITY_KINDS, generate_demo_pool
from pipelines.reports import LABEL_WIDTH, THUMB
from pipelines.stage import run_stage
from pipelines.stages.filter import FilterConfig
from pipelines.stages.ingest import IngestConfig
from tests.conftest import DEMO_FILTER
from tests.helpers import run_cli

PER_KIND = 5
RULE_OF_KIND = {"blurred": "blurry", "constant": "constant", "tiny": "small", "extreme_aspect": "aspect"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[str, str, dict[str, str]]:
    """A 300-file demo pool plus PER_KIND planted images of each low-quality kind, ingested and filtered.

    Returns the catalog, the pool folder and {uri: planted kind, "" for every other file}."""
    out = str(tmp_path_factory.mktemp("quality") / "demo")
    summary = generate_demo_pool(out, n=300, seed=1, workers=1, low_quality_per_kind=PER_KIND)
    assert summary["low_quality"] == PER_KIND * len(LOW_QUALITY_KINDS)
    root = os.path.join(out, "catalog")
    run_stage("ingest", root, IngestConfig(source=os.path.join(out, "pool")), executor="local")
    truth = pq.read_table(os.path.join(out, "truth", "pool.parquet")).to_pylist()
    kinds = {os.path.join(out, "pool", r["relpath"]): r["detail"] if r["kind"] == "low_quality" else ""
             for r in truth}
    result = run_cli(["filter", "--catalog", root, "--set", *DEMO_FILTER])
    assert result.returncode == 0, result.stderr
    return root, os.path.join(out, "pool"), kinds


def test_signals_of_known_images():
    half = np.zeros((40, 80, 3), np.uint8)
    half[:, 40:] = 255
    s = quality_signals(Image.fromarray(half), 80, 40)
    assert (s.min_side, s.aspect) == (40, 2.0)
    assert s.dark_fraction == pytest.approx(0.5) and s.bright_fraction == pytest.approx(0.5)
    assert s.colour_entropy == pytest.approx(1.0)  # two colours, equally many pixels: one bit
    assert not s.nearly_constant
    flat = quality_signals(Image.new("RGB", (300, 200), (90, 140, 30)), 300, 200)
    assert flat.nearly_constant and flat.sharpness == pytest.approx(0.0, abs=1e-6) and flat.colour_entropy == 0.0
    assert (flat.dark_fraction, flat.bright_fraction) == (0.0, 0.0)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    sharp = quality_signals(noise, 256, 256).sharpness
    blurred = quality_signals(noise.filter(ImageFilter.GaussianBlur(8)), 256, 256).sharpness
    assert blurred < sharp / 100
    # the size signals come from the displayed size, not the (draft) decode
    assert quality_signals(Image.new("RGB", (20, 5)), 400, 100).min_side == 100


def test_laplacian_variance_matches_scipy_on_the_interior():
    from scipy import ndimage

    grey = np.random.default_rng(1).uniform(0, 255, (37, 52)).astype(np.float32)
    assert laplacian_variance(grey) == pytest.approx(float(ndimage.laplace(grey)[1:-1, 1:-1].var()), rel=1e-5)
    assert laplacian_variance(grey[:2]) == 0.0


def test_the_first_failed_rule_names_the_removal():
    columns = {"nearly_constant": np.array([True, False, False, False]),
               "min_side": np.array([10, 10, 300, 300]), "aspect": np.array([1.0, 5.0, 5.0, 1.0]),
               "sharpness": np.array([0.0, 100.0, 1.0, 100.0]), "dark_fraction": np.zeros(4),
               "bright_fraction": np.zeros(4), "colour_entropy": np.full(4, 4.0)}
    names = [r.name for r in RULES]
    config = FilterConfig(drop_constant=True, min_side=24, max_aspect=3, min_sharpness=6)
    assert first_failed_rule(columns, config.thresholds()).tolist() == \
        [names.index("constant"), names.index("small"), names.index("aspect"), -1]
    assert first_failed_rule(columns, FilterConfig().thresholds()).tolist() == [-1] * 4


def test_filter_removes_exactly_the_planted_images(planted):
    root, _, kinds = planted
    rows = query(root, "SELECT uri, reason, message FROM errors WHERE stage = 'filter'").to_pylist()
    removed = {r["uri"] for r in rows}
    planted_uris = {u for u, k in kinds.items() if k}
    hit = len(removed & planted_uris)
    precision, recall = hit / len(removed), hit / len(planted_uris)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    for r in rows:  # each planted image under its own rule, with the value against the threshold
        if kinds[r["uri"]]:
            assert r["reason"] == "filtered:" + RULE_OF_KIND[kinds[r["uri"]]], r
    assert any(m.startswith("min_side ") and m.endswith(" < 24") for m in (r["message"] for r in rows))
    assert query(root, "SELECT count(*) FROM pool WHERE status = 'ok' AND sharpness IS NULL").column(0)[0].as_py() == 0
    assert query(root, "SELECT count(*) FROM pool WHERE status = 'error' AND sharpness IS NOT NULL"
                 ).column(0)[0].as_py() == 0


@pytest.mark.slow  # two cluster runs and a sample with its report: ~45 s on 2 loaded cores
def test_cluster_leaves_out_filtered_images_and_follows_a_new_filter(planted, tmp_path):
    import shutil

    root = str(tmp_path / "cat")
    shutil.copytree(planted[0], root)
    ids = query(root, "SELECT image_id FROM pool WHERE status = 'ok' ORDER BY 1").column(0).to_numpy()
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((len(ids), 8)).astype(np.float32))
    np.save(tmp_path / "ids.npy", ids)
    cluster = ["cluster", "--catalog", root, "--embeddings", str(tmp_path / "x.npy"), "--ids",
               str(tmp_path / "ids.npy"), "--levels", "2", "--set", "resampling_steps=1", "exclude_duplicates=false"]
    assert run_cli(cluster).returncode == 0
    leaked = "SELECT count(*) FROM clusters WHERE image_id IN (SELECT image_id FROM errors WHERE stage = 'filter')"
    assert query(root, leaked).column(0)[0].as_py() == 0
    n_filtered = query(root, "SELECT count(*) FROM errors WHERE stage = 'filter'").column(0)[0].as_py()
    assert query(root, "SELECT count(*) FROM clusters").column(0)[0].as_py() == len(ids) - n_filtered
    # other thresholds (changed settings need --overwrite): cluster sees the new removals and reruns
    changed = run_cli(["filter", "--catalog", root, "--set", "min_side=60"])
    assert changed.returncode == 2 and "--overwrite" in changed.stderr
    assert run_cli(["filter", "--catalog", root, "--overwrite", "--set", "min_side=60"]).returncode == 0
    again = run_cli(cluster)
    assert again.returncode == 0 and "changed since it last ran" in again.stderr, again.stderr
    assert query(root, leaked).column(0)[0].as_py() == 0
    small = query(root, "SELECT count(*) FROM pool WHERE status = 'ok' AND min_side < 60").column(0)[0].as_py()
    assert query(root, "SELECT count(*) FROM clusters").column(0)[0].as_py() == len(ids) - small
    assert run_cli(["sample", "--catalog", root, "--target-size", "50"]).returncode == 0
    with Image.open(os.path.join(root, "reports", "lvd", "quality_signals.png")) as img:
        assert img.width > 600 and img.height > 400  # six panels
    with Image.open(os.path.join(root, "reports", "lvd", "filtered.png")) as img:
        assert img.height == 20 + 1 * (THUMB + 2)  # one row: the one rule set
        cell = np.asarray(img.convert("L"))[20:20 + THUMB, LABEL_WIDTH:LABEL_WIDTH + THUMB]
    assert cell.std() > 0  # a removed image's thumbnail, not the blank sheet


def test_filter_refuses_a_pool_ingested_before_the_signals(tmp_path):
    old = pa.schema([f for f in POOL if f.name not in QUALITY_COLUMNS])
    rows = [{"image_id": 1, "uri": "/x.jpg", "bytes": 10, "width": 64, "height": 64, "format": "JPEG",
             "sha256": "0" * 64, "status": "ok"}]
    root = str(tmp_path / "cat")
    write_shards(root, "pool", "ingest=files-000000", pa.Table.from_pylist(rows, schema=stamp(old, "pool")))
    with pytest.raises(MissingInputError, match="ingest .*--overwrite"):
        run_stage("filter", root, FilterConfig(min_side=10))
    new_rows = [dict(rows[0], image_id=2, uri="/y.jpg", **{c: None for c in QUALITY_COLUMNS})]
    new_rows[0].update(min_side=64, aspect=1.0, sharpness=50.0, dark_fraction=0.0, bright_fraction=0.0,
                       colour_entropy=3.0, nearly_constant=False)
    write_shards(root, "pool", "ingest=files-000001", pa.Table.from_pylist(new_rows, schema=stamp(POOL, "pool")))
    with pytest.raises(MissingInputError, match="1 of 2 usable pool images have no quality signals"):
        run_stage("filter", root, FilterConfig(min_side=10), overwrite=True)


def test_planted_kinds_have_their_defects(planted):
    _, pool, kinds = planted
    for uri, kind in kinds.items():
        if kind in ("tiny", "extreme_aspect"):
            with Image.open(uri) as img:
                short, long = sorted(img.size)
            assert (long <= 20) if kind == "tiny" else (long / short >= 4 and short >= 32), (kind, img.size)
    assert sum(k == "blurred" for k in kinds.values()) == PER_KIND


def test_build_lvd_refuses_to_drop_a_filter_silently(planted, tmp_path):
    import shutil

    root = str(tmp_path / "cat")
    shutil.copytree(planted[0], root)
    # the filter ran with rules; a build-lvd without them is a change of its settings, refused before embedding
    result = run_cli(["build-lvd", "--catalog", root, "--target-size", "10", "--set", *DEMO_SETTINGS])
    assert result.returncode == 2 and "filter" in result.stderr and "--overwrite" in result.stderr, result.stderr
    assert not os.path.exists(os.path.join(root, "embeddings"))
