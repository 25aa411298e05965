import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from catalog.decode import Preprocess, decode_crop, decode_rgb, plain_jpeg
from catalog.embeddings import (
    ModelMismatchError,
    embedding_metadata,
    export_npy,
    import_npy,
    load_embeddings,
)
from catalog.images import read_image_bytes
from catalog.ledger import Ledger
from catalog.sql import query
from pipelines.demo.job import DEMO_BACKBONE
from pipelines.stage import run_stage
from pipelines.stages.embed import EmbedConfig
from tests.helpers import run_cli
from training.models.checkpoints import inspect_backbone, load_backbone

TINY = ["model=vit_test", "random_init=true", "image_size=32", "images_per_unit=40", "batch_size=16"]
TINY_CONFIG = EmbedConfig(model="vit_test", image_size=32, images_per_unit=40, batch_size=16, random_init=True)
DEMO_ON_DEVICE = EmbedConfig(model=f"curate:{DEMO_BACKBONE}", images_per_unit=100, batch_size=64, decode="device")


def _copy_catalog(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("embeddings", "_ledger"))
    return dst


@pytest.fixture(scope="module")
def embedded(demo_catalog, tmp_path_factory) -> str:
    root = _copy_catalog(demo_catalog, str(tmp_path_factory.mktemp("emb") / "cat"))
    result = run_cli(["embed", "--catalog", root, "--set", *TINY])
    assert result.returncode == 0, result.stderr
    assert "randomly initialised" in result.stderr
    return root


def test_every_usable_image_has_one_embedding_and_no_broken_file(embedded):
    ok = set(query(embedded, "SELECT image_id FROM pool WHERE status = 'ok'").column(0).to_pylist())
    bad = set(query(embedded, "SELECT image_id FROM pool WHERE status = 'error'").column(0).to_pylist())
    ids, x = load_embeddings(embedded)
    assert len(ids) == len(set(ids.tolist())) == len(ok) and set(ids.tolist()) == ok
    assert not (set(ids.tolist()) & bad)
    assert x.shape == (len(ok), 64) and np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
    meta = embedding_metadata(embedded)
    assert meta["model"] == "vit_test" and meta["preprocess"] == Preprocess(size=32).fingerprint()


def test_vectors_equal_a_direct_forward_of_the_backbone(embedded):
    ids, x = load_embeddings(embedded)
    rows = query(embedded, "SELECT image_id, uri FROM pool WHERE status = 'ok' ORDER BY image_id LIMIT 5").to_pylist()
    model, _ = load_backbone("vit_test", None)
    pre = Preprocess(size=32)
    batch = np.stack([pre(decode_rgb(read_image_bytes(r["uri"]), min_side=pre.resize_size)) for r in rows])
    with torch.inference_mode():
        direct = model.embed(torch.from_numpy(batch)).numpy()
    by_id = dict(zip(ids.tolist(), x))
    got = np.stack([by_id[r["image_id"]] for r in rows]).astype(np.float32)
    assert np.allclose(got, direct, atol=2e-3)


def test_rerun_does_nothing_and_other_model_is_refused(embedded):
    result = run_cli(["embed", "--catalog", embedded, "--set", *TINY])
    assert result.returncode == 0 and "0 images embedded in this run" in result.stdout
    with pytest.raises(ModelMismatchError, match="never mixed"):
        run_stage("embed", embedded, EmbedConfig(model="vit_test14", image_size=28, random_init=True))
    result = run_cli(["embed", "--catalog", embedded, "--model", "vit_test14", "--set", "image_size=28", "random_init=true"])
    assert result.returncode == 2 and "never mixed" in result.stderr


def test_npy_export_and_import_round_trip(embedded, tmp_path):
    x_path, id_path = export_npy(embedded, str(tmp_path / "npy"))
    ids, x = load_embeddings(embedded)
    assert np.array_equal(np.load(id_path), ids) and np.array_equal(np.load(x_path, mmap_mode="r"), x)
    other = str(tmp_path / "other")
    assert import_npy(x_path, id_path, other, embedding_metadata(embedded), rows_per_shard=100) == len(ids)
    ids2, x2 = load_embeddings(other)
    assert np.array_equal(ids2, ids) and np.array_equal(x2, x)


@pytest.mark.slow
def test_in_process_and_ray_give_identical_tables_with_one_backbone_per_worker(embedded, demo_catalog, tmp_path,
                                                                               monkeypatch):
    from training.models.vit import VisionTransformer

    built = []
    init = VisionTransformer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(os.getpid())
        init(self, *args, **kwargs)

    monkeypatch.setattr(VisionTransformer, "__init__", counting_init)
    config = TINY_CONFIG
    tables = {}
    for executor in ("local", "ray"):
        root = _copy_catalog(demo_catalog, str(tmp_path / executor))
        built.clear()
        result = run_stage("embed", root, config, executor=executor)
        workers = {m["worker"] for m in Ledger(root, "embed").done().values()}
        if executor == "local":  # one backbone for the whole run, in this process
            assert built == [os.getpid()] and result.units_run > 2
        else:  # the driver built none; one actor (the default pool size) embedded every unit
            assert built == [] and len(workers) == 1 and not any(w.endswith(f":{os.getpid()}") for w in workers)
        tables[executor] = [query(root, sql).to_pylist() for sql in ("SELECT image_id, embedding FROM embeddings "
                                                                     "ORDER BY 1", "SELECT * FROM errors ORDER BY 1")]
    assert tables["local"] == tables["ray"]
    assert tables["ray"][0] == query(embedded, "SELECT image_id, embedding FROM embeddings ORDER BY 1").to_pylist()


def _tables(root: str) -> list[list[dict]]:
    return [query(root, sql).to_pylist() for sql in ("SELECT image_id, embedding FROM embeddings ORDER BY 1",
                                                     "SELECT * FROM errors ORDER BY 1")]


@pytest.fixture(scope="module")
def embedded_on_device(demo_catalog, tmp_path_factory) -> str:
    """The demo catalog embedded with the shipped demo backbone on the device path of a CPU worker (PIL
    standing in for nvJPEG); random backbones give nearly one vector for every image, this one does not."""
    root = _copy_catalog(demo_catalog, str(tmp_path_factory.mktemp("emb_dev") / "cat"))
    run_stage("embed", root, DEMO_ON_DEVICE, executor="local")
    return root


@pytest.mark.slow
def test_device_path_gives_the_host_path_rows_errors_and_close_vectors(embedded, embedded_on_device):
    (rows, errors), (ref_rows, ref_errors) = _tables(embedded_on_device), _tables(embedded)
    assert errors == ref_errors and [r["image_id"] for r in rows] == [r["image_id"] for r in ref_rows]
    pool = query(embedded_on_device, "SELECT image_id, uri FROM pool WHERE status = 'ok' ORDER BY image_id").to_pylist()
    data = [read_image_bytes(r["uri"]) for r in pool[::6]]
    assert sum(map(plain_jpeg, data)) > 0.7 * len(data)  # most images took the device decoder
    model, _ = load_backbone(DEMO_ON_DEVICE.model, None)
    spec = inspect_backbone(DEMO_ON_DEVICE.model, None).input
    pre = Preprocess(size=spec.size, mean=spec.mean, std=spec.std)
    assert embedding_metadata(embedded_on_device)["preprocess"] == pre.fingerprint()
    with torch.inference_mode():
        host = model.embed(torch.from_numpy(pre.normalize_batch(np.stack([decode_crop(d, pre) for d in data])))).numpy()
    ids, x = load_embeddings(embedded_on_device)
    by_id = dict(zip(ids.tolist(), x.astype(np.float32)))
    cos = np.einsum("nd,nd->n", np.stack([by_id[r["image_id"]] for r in pool[::6]]), host)
    # 64 px: the host path decodes most demo JPEGs at half scale, the device path at full size
    assert np.median(cos) > 0.9995 and cos.min() > 0.97, (np.median(cos), cos.min())
    shuffled = np.einsum("nd,nd->n", np.roll(host, 1, axis=0), host)
    assert np.median(shuffled) < 0.9  # what a misordered row would score


@pytest.mark.slow
def test_device_path_on_ray_with_two_units_per_actor_equals_in_process(embedded_on_device, demo_catalog, tmp_path):
    root = _copy_catalog(demo_catalog, str(tmp_path / "cat"))
    result = run_stage("embed", root, replace(DEMO_ON_DEVICE, units_in_flight=2), executor="ray")
    assert result.units_run > 2 and len({m["worker"] for m in Ledger(root, "embed").done().values()}) == 1
    assert _tables(root) == _tables(embedded_on_device)
