"""`curate pack`: a part's images in tar shards, read back by the training dataset byte for byte."""

import io
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from catalog.decode import decode_rgb
from catalog.images import read_image_bytes
from catalog.ledger import Ledger
from catalog.shards import read_table
from pipelines.stages.pack import image_id_of_key, sample_key, stored_bytes
from tests.helpers import run_cli
from tests.train_helpers import PARTS, make_catalog
from training.data.dataset import PartDataset
from training.train.data import part_table


def test_packed_part_serves_the_same_images_from_tar_shards(tmp_path):
    catalog = make_catalog(tmp_path, per_part=7)
    part = PARTS[0]
    original = read_table(catalog, f"curated/{part}", ["image_id", "uri"]).to_pylist()
    os.remove(original[3]["uri"])  # an image gone from the pool before packing
    assert part_table(catalog, part).column("uri").to_pylist() == [r["uri"] for r in original]

    result = run_cli(["pack", "--catalog", catalog, "--part", part, "--images-per-shard", "3"])
    assert result.returncode == 0, result.stderr
    assert "6 images, 1 unreadable" in result.stdout
    shards = sorted(os.listdir(os.path.join(catalog, "packed", part, "shards")))
    assert len(shards) == 3 and all(f.endswith(".tar") for f in shards)
    with tarfile.open(os.path.join(catalog, "packed", part, "shards", shards[0])) as tar:
        names = tar.getnames()  # every image a JPEG: the originals under .jpg, a .json sidecar each
        assert len(names) == 6 and [n.rpartition(".")[2] for n in names] == ["jpg", "json"] * 3
    stored = pq.ParquetDataset(os.path.join(catalog, "packed", part, "index")).read().column("uri").to_pylist()
    assert all(u.startswith(f"packed/{part}/shards/shard-") for u in stored)  # relative to the catalog root

    packed = part_table(catalog, part).to_pylist()
    assert [r["image_id"] for r in packed] == [r["image_id"] for i, r in enumerate(original) if i != 3]
    by_id = {r["image_id"]: r["uri"] for r in original}
    for row in packed:
        assert "#offset=" in row["uri"]
        assert read_image_bytes(row["uri"]) == read_image_bytes(by_id[row["image_id"]])
    dataset = PartDataset(part, part_table(catalog, part))
    assert dataset.load(0).size == (48, 40)

    again = run_cli(["pack", "--catalog", catalog, "--part", part, "--images-per-shard", "3"])
    assert again.returncode == 0 and len(Ledger(catalog, f"pack-{part}").done()) == 3
    assert part_table(catalog, part).num_rows == 6  # rerun adds no rows


def test_sample_keys_are_unsigned_hex_of_the_signed_image_id():
    for image_id in (-(2**63), -1, 0, 1, 2**63 - 1, -1234567890123456789):
        key = sample_key(image_id)
        assert len(key) == 16 and "." not in key and int(key, 16) == image_id % 2**64
        assert image_id_of_key(key) == image_id
    assert sample_key(-1) == "f" * 16 and sample_key(1) == "0" * 15 + "1"


def _png(image: Image.Image, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **params)
    return out.getvalue()


def test_a_plain_pil_decode_of_every_packed_png_gives_the_trainers_pixels():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    grey16 = Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16))
    rgba = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), mode="RGBA")
    palette = rgb.convert("P")
    originals = {"rgb": _png(rgb), "grey": _png(rgb.convert("L")), "palette": _png(palette),
                 "grey16": _png(grey16), "rgba": _png(rgba), "transparent": _png(palette, transparency=0)}
    for name, data in originals.items():
        stored = stored_bytes(data, "png")
        assert (stored == data) == (name in ("rgb", "grey", "palette")), name  # 8-bit, no alpha: byte for byte
        plain = Image.open(io.BytesIO(stored)).convert("RGB")  # what WebDataset's "pil" decoder does
        assert np.array_equal(np.asarray(plain), np.asarray(decode_rgb(data))), name
    assert np.asarray(decode_rgb(originals["grey16"])).mean() < 200  # 16-bit grey is scaled, not white
