"""The dedup stage with the built-in copy descriptor and its pixel check on a small planted pool, and
its guard against removing an implausible share of the pool."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalog.errors import UserError
from catalog.schemas import metadata_of
from catalog.shards import shard_urls
from catalog.sql import query
from curation.copy_descriptor import DIM, NAME
from curation.synthetic_images import coin, combined, crop, flip, glyph, random_scene
from pipelines.stage import run_stage
from pipelines.stages.dedup import DedupConfig
from pipelines.stages.ingest import IngestConfig

N_DISTINCT = 30
COPIES = {"flip": [0, 1, 2, 3], "combined": [4, 5]}  # planted copies of these originals
LOOK_ALIKES = {"coin20": coin("20", 64), "coin25": coin("25", 64), "c": glyph("c", 64), "o": glyph("o", 64)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """30 distinct scenes and 6 copies of 6 of them (4 mirrored, 2 mirrored/cropped/jittered/re-encoded),
    4 look-alikes that the descriptor alone merges (coins 20/25, c/o) and a cropped copy of coin 20,
    ingested; returns (catalog root, {copy uri: original uri})."""
    folder = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, 128, 104) for _ in range(N_DISTINCT)]
    for i, img in enumerate(scenes):
        img.save(folder / f"scene{i:02d}.png")
    truth = {}
    for kind, originals in COPIES.items():
        variant = {"flip": flip, "combined": combined}[kind]
        for i in originals:
            variant(scenes[i], rng).convert("RGB").save(folder / f"copy_{kind}{i:02d}.jpg", quality=90)
            truth[str(folder / f"copy_{kind}{i:02d}.jpg")] = str(folder / f"scene{i:02d}.png")
    for name, img in LOOK_ALIKES.items():
        img.save(folder / f"glyph_{name}.png")
    crop(LOOK_ALIKES["coin20"], rng).save(folder / "copy_crop_coin20.jpg", quality=85)
    truth[str(folder / "copy_crop_coin20.jpg")] = str(folder / "glyph_coin20.png")
    root = str(tmp_path_factory.mktemp("catalog"))
    run_stage("ingest", root, IngestConfig(source=str(folder)), executor="local")
    return root, truth


def test_copy_descriptors_are_the_compact_flip_robust_ones(planted):
    root, _ = planted
    table = pq.read_table(shard_urls(root, "copy_descriptors")[0])
    assert table.schema.field("embedding").type.value_type == "halffloat"
    assert table.schema.field("embedding").type.list_size == DIM < 3072
    assert metadata_of(table.schema)["descriptor"] == NAME


def test_mirrored_and_edited_copies_are_found_and_nothing_else(planted):
    root, truth = planted
    result = run_stage("dedup", root, DedupConfig(), executor="local")
    rows = query(root, "SELECT p.uri, k.uri AS kept FROM duplicates d JOIN pool p USING (image_id) "
                       "JOIN pool k ON k.image_id = d.kept_id WHERE d.reason = 'copy'").to_pylist()
    found = {frozenset((_path(r["uri"]), _path(r["kept"]))) for r in rows}
    assert found == {frozenset((_path(c), _path(o))) for c, o in truth.items()}
    assert result.summary["removed"]["copy"] == len(truth)


def _path(uri: str) -> str:
    return uri.removeprefix("file://")


def test_an_implausible_share_fails_with_the_numbers_and_the_knob(planted, tmp_path):
    root, truth = planted
    loose = DedupConfig(threshold=-1.0, check_threshold=None)  # every neighbour pair is a "copy"
    with pytest.raises(UserError) as err:
        run_stage("dedup", root, loose, overwrite=True, executor="local")
    message = str(err.value)
    n = N_DISTINCT + len(LOOK_ALIKES) + len(truth)
    assert f"of {n} usable images" in message and "max_removed_share=0.2" in message
    assert "dedup.max_removed_share" in message and message.count("  ~  ") == 3
    assert message.count("scene") + message.count("copy_") + message.count("glyph_") == 6  # both, by URI
    removed = int(message.split("dedup would remove ")[1].split(" ")[0])
    assert removed / n > 0.2
    allowed = run_stage("dedup", root, DedupConfig(threshold=-1.0, check_threshold=None, max_removed_share=1.0), overwrite=True,
                        executor="local")
    assert allowed.summary["removed"]["copy"] == removed


def test_descriptors_of_an_earlier_version_are_refused_with_the_remedy(planted, tmp_path):
    """An older curate's ingest wrote another descriptor: dedup says so instead of thresholding it."""
    import shutil

    root, _ = planted
    old = tmp_path / "old_catalog"
    shutil.copytree(root, old)
    shard = shard_urls(str(old), "copy_descriptors")[0]
    table = pq.read_table(shard)
    meta = {**table.schema.metadata, b"curate.descriptor": b"hog6x6x8+ycc8"}
    pq.write_table(table.replace_schema_metadata(meta), shard)
    with pytest.raises(UserError, match=r"made by \['hog6x6x8\+ycc8'\].*curate ingest SOURCE --catalog .* --overwrite"):
        run_stage("dedup", str(old), DedupConfig(), overwrite=True, executor="local")
