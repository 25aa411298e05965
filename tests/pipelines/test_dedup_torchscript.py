"""``dedup.descriptor=torchscript:PATH``: a TorchScript copy-detection model built here with SSCD's
conventions (ImageNet-normalised [N, 3, 320, 320] in, [N, 512] out), its own float16 table with the
file's hash, a calibrated threshold and its precision and recall in the report."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from catalog.errors import UserError
from catalog.schemas import metadata_of
from catalog.shards import shard_urls
from catalog.sql import query
from curation.synthetic_images import crop, jitter, random_scene, reencode
from pipelines.demo.pool import injected_copy_groups
from pipelines.stage import run_stage
from pipelines.stages.dedup import DedupConfig
from pipelines.stages.ingest import IngestConfig

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class PooledColour(torch.nn.Module):
    """A stand-in copy descriptor: a 16×16 colour thumbnail of the image and its mirror image, summed
    (flip-invariant), projected to ``dim`` values by a fixed random matrix."""

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 16 * 16, dim, generator=g) / 28.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 320, 320)  # SSCD's skew_320 input
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 16)
        pooled = pooled + pooled.flip(-1)
        pooled = pooled - pooled.mean(dim=(2, 3), keepdim=True)
        return pooled.flatten(1) @ self.proj


def _save(module: torch.nn.Module, path: Path) -> str:
    torch.jit.script(module).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """16 distinct scenes and 4 edited copies of 4 of them, ingested: (root, {copy: original})."""
    folder = tmp_path_factory.mktemp("ts_pool")
    rng = np.random.default_rng(5)
    scenes = [random_scene(rng, 120, 96) for _ in range(16)]
    for i, img in enumerate(scenes):
        img.save(folder / f"scene{i:02d}.png")
    truth = {}
    for i, edit in zip(range(4), (crop, jitter, reencode, lambda im, r: reencode(crop(im, r), r))):
        edit(scenes[i], rng).convert("RGB").save(folder / f"copy{i:02d}.jpg", quality=90)
        truth[f"copy{i:02d}.jpg"] = f"scene{i:02d}.png"
    root = str(tmp_path_factory.mktemp("ts_catalog"))
    run_stage("ingest", root, IngestConfig(source=str(folder)), executor="local")
    return root, truth


def test_a_torchscript_model_finds_the_copies_with_a_calibrated_threshold(pool, tmp_path):
    root, truth = pool
    path = _save(PooledColour(), tmp_path / "sscd_standin.pt")
    result = run_stage("dedup", root, DedupConfig(descriptor=f"torchscript:{path}", calibration_groups=12),
                       executor="local")

    table = pq.read_table(shard_urls(root, "model_copy_descriptors")[0])
    assert table.num_rows == 20
    assert table.schema.field("embedding").type.value_type == "halffloat"
    assert table.schema.field("embedding").type.list_size == 512
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert metadata_of(table.schema)["descriptor"] == f"sha256:{digest}"
    x = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)

    cal = result.summary["calibration"]
    report = json.loads((Path(root) / "reports" / "dedup" / "calibration.json").read_text())
    assert report["model_id"] == f"sha256:{digest}"
    assert report["calibration"]["precision"] == pytest.approx(cal["precision"], abs=1e-4)
    files, _ = injected_copy_groups(12, seed=0)  # by default, the demo pool's injected groups
    assert report["calibration"]["images"] == len(files) and "injected_copy_groups(12" in report["calibration_set"]
    assert 0 < cal["threshold"] < 1 and cal["precision"] > 0.5 and cal["recall"] > 0.5
    rows = query(root, "SELECT p.uri, k.uri AS kept FROM duplicates d JOIN pool p USING (image_id) "
                       "JOIN pool k ON k.image_id = d.kept_id WHERE d.reason = 'copy'").to_pylist()
    found = {frozenset((Path(r["uri"]).name, Path(r["kept"]).name)) for r in rows}
    assert found == {frozenset(pair) for pair in truth.items()}


def test_a_model_with_another_output_size_is_refused_with_the_knob(pool, tmp_path):
    root, _ = pool
    path = _save(PooledColour(dim=256), tmp_path / "small.pt")
    with pytest.raises(UserError, match=r"expected \[\d+, 512\] \(set model_dim"):
        run_stage("dedup", root, DedupConfig(descriptor=f"torchscript:{path}"), overwrite=True, executor="local")
    (tmp_path / "not_a_model.pt").write_bytes(b"not torchscript")
    with pytest.raises(UserError, match="not a TorchScript model"):
        run_stage("dedup", root, DedupConfig(descriptor=f"torchscript:{tmp_path / 'not_a_model.pt'}"),
                  overwrite=True, executor="local")


def test_calibration_on_a_folder_of_copy_groups_is_reported_by_its_folder(pool, tmp_path):
    root, truth = pool
    path = _save(PooledColour(), tmp_path / "sscd_standin.pt")
    groups, rng = tmp_path / "groups", np.random.default_rng(9)
    for g in range(5):  # as a demo pool's eval/instances: one folder of copies per group
        (groups / f"group{g}").mkdir(parents=True)
        scene = random_scene(rng, 110, 90)
        scene.save(groups / f"group{g}" / "original.png")
        crop(scene, rng).convert("RGB").save(groups / f"group{g}" / "crop.jpg", quality=90)
        reencode(scene, rng).convert("RGB").save(groups / f"group{g}" / "reencoded.jpg", quality=90)
    (groups / "group0" / "notes.txt").write_text("not an image")
    result = run_stage("dedup", root, DedupConfig(descriptor=f"torchscript:{path}", calibration_copies=str(groups)),
                       overwrite=True, executor="local")
    report = json.loads((Path(root) / "reports" / "dedup" / "calibration.json").read_text())
    assert report["calibration_set"] == str(groups)
    assert report["calibration"]["images"] == 15 and report["calibration"]["copy_pairs"] == 15
    assert result.summary["calibration"]["recall"] > 0.5

    single = tmp_path / "single"
    for g in range(3):
        (single / f"g{g}").mkdir(parents=True)
        random_scene(rng, 64, 64).save(single / f"g{g}" / "only.png")
    with pytest.raises(UserError, match="at least two groups and one of two images"):
        run_stage("dedup", root, DedupConfig(descriptor=f"torchscript:{path}", calibration_copies=str(single)),
                  overwrite=True, executor="local")


def _scenes(folder: Path, rng: np.random.Generator, names: range) -> None:
    for i in names:
        random_scene(rng, 120, 96).save(folder / f"scene{i:02d}.png")


def test_a_grown_pool_describes_only_its_new_and_changed_images(tmp_path, monkeypatch):
    import pipelines.dedup_model as dedup_model

    folder = tmp_path / "pool"
    folder.mkdir()
    rng = np.random.default_rng(11)
    _scenes(folder, rng, range(10))
    descriptor = DedupConfig(descriptor=f"torchscript:{_save(PooledColour(), tmp_path / 'm.pt')}",
                             calibration_groups=6)
    grown, scratch = str(tmp_path / "grown"), str(tmp_path / "scratch")
    run_stage("ingest", grown, IngestConfig(source=str(folder)), executor="local")
    run_stage("dedup", grown, descriptor, executor="local")
    _scenes(folder, rng, range(10, 13))  # three new scenes,
    with Image.open(folder / "scene03.png") as img:  # a copy of an old one,
        crop(img, rng).convert("RGB").save(folder / "copy03.jpg", quality=90)
    _scenes(folder, rng, range(5, 6))  # and one rewritten under its name
    run_stage("ingest", grown, IngestConfig(source=str(folder)), executor="local")
    decoded = [0]
    real = dedup_model.decode_rgb

    def counted(*args, **kwargs):
        decoded[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(dedup_model, "decode_rgb", counted)
    result = run_stage("dedup", grown, descriptor, executor="local")
    assert decoded[0] == 5 and result.summary["descriptors"] == {"images": 14, "described": 5}
    monkeypatch.undo()
    run_stage("ingest", scratch, IngestConfig(source=str(folder)), executor="local")
    run_stage("dedup", scratch, descriptor, executor="local")

    def rows(root: str, sql: str) -> list[dict]:
        return query(root, sql).to_pylist()

    by_uri = ("SELECT p.uri, d.embedding FROM model_copy_descriptors d JOIN pool p USING (image_id) "
              "ORDER BY p.uri")
    kept, fresh = rows(grown, by_uri), rows(scratch, by_uri)
    assert [r["uri"] for r in kept] == [r["uri"] for r in fresh]  # a batch of other images may move the last
    np.testing.assert_allclose([r["embedding"] for r in kept], [r["embedding"] for r in fresh], atol=1e-4)  # bit
    copies = ("SELECT p.uri, k.uri AS kept FROM duplicates d JOIN pool p USING (image_id) "
              "JOIN pool k ON k.image_id = d.kept_id ORDER BY 1")
    assert rows(grown, copies) == rows(scratch, copies) and len(rows(grown, copies)) == 1
