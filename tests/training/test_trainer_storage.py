"""A training run whose output_dir and eval inputs live on object storage (``memory://``, the S3 test server).

The reference is the same run on local disk: the run on the store resumes from its own checkpoint and
must reproduce the reference's losses, scores and exported teacher bit for bit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from catalog.manifest import list_manifests
from catalog.paths import join, ls, read_bytes, resolve, write_bytes_atomic
from pipelines.demo.concepts import dense_probe_set
from tests.helpers import s3_server
from tests.train_helpers import TINY, make_catalog
from training.train.checkpoint import COMPLETE, checkpoint_dirs
from training.train.config import load_train_config
from training.train.launch import result_of_run, run_training
from training.train.run_state import EVALS_FILE, read_metrics

BUCKET = "curate-train"
STEPS = 4
LOSS_KEYS = ("total", "dino_local", "dino_global", "koleo", "ibot")


@pytest.fixture(scope="module")
def s3_bucket():
    with s3_server(BUCKET):
        yield f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A catalog, a labelled folder and a dense-probe set on local disk, and the reference run on them."""
    root = tmp_path_factory.mktemp("storage")
    catalog = make_catalog(root, per_part=6)
    labelled = root / "labelled"
    for part in ("shapes_a", "shapes_b"):
        (labelled / part).mkdir(parents=True)
        for image in sorted((root / "images").glob(f"{part}_*.jpg"))[:4]:
            (labelled / part / image.name).write_bytes(image.read_bytes())
    images, masks = dense_probe_set(6, 64, seed=0)
    np.savez_compressed(root / "probe.npz", images=images, masks=masks)
    result = run_training(_config(catalog, str(root / "run"), str(labelled), str(root / "probe.npz")))
    return catalog, labelled, root / "probe.npz", result


def _config(catalog: str, output_dir: str, knn_folder: str, dense_probe: str, *overrides: str):
    return load_train_config(TINY, [f"data.catalog_root={catalog}", f"output_dir={output_dir}",
                                    f"eval.knn_folder={knn_folder}", f"eval.dense_probe={dense_probe}",
                                    f"optim.iterations={STEPS}", "checkpoint.period=2", *overrides])


def _upload(local: Path, url: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        write_bytes_atomic(join(url, path.relative_to(local).as_posix()), path.read_bytes())


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_output_dir_and_eval_inputs_on_object_storage_resume_exactly(store, local_run, tmp_path, request):
    catalog, labelled, probe, reference = local_run
    base = f"memory://train-{tmp_path.name}" if store == "memory" else f"{request.getfixturevalue('s3_bucket')}/run"
    knn_folder, probe_url, out = join(base, "labelled"), join(base, "probe.npz"), join(base, "out")
    _upload(labelled, knn_folder)
    write_bytes_atomic(probe_url, probe.read_bytes())

    first = run_training(_config(catalog, out, knn_folder, probe_url, "max_steps=2"))
    assert (first.steps_done, first.teacher_path) == (2, None)
    assert [m["step"] for m in read_metrics(out)] == [0, 1]
    resumed = run_training(_config(catalog, out, knn_folder, probe_url))
    assert (resumed.resumed_from, resumed.steps_done) == (2, STEPS)

    ours, theirs = read_metrics(out), read_metrics(reference.output_dir)
    assert [m["step"] for m in ours] == list(range(STEPS))
    assert [[m[k] for k in LOSS_KEYS] for m in ours] == [[m[k] for k in LOSS_KEYS] for m in theirs]
    assert read_metrics(out, EVALS_FILE) == read_metrics(reference.output_dir, EVALS_FILE)
    assert [row["step"] for row in read_metrics(out, EVALS_FILE)] == [2, 4]

    # Both checkpoints committed with their marker (no folder rename on object stores); the teacher is exact.
    steps = checkpoint_dirs(join(out, "ckpt"))
    assert [url.rsplit("/", 1)[-1] for url in steps] == ["00000002", "00000004"]
    assert all(join(url, COMPLETE) in ls(url) for url in steps)
    exported = read_bytes(resumed.teacher_path)
    assert hashlib.sha256(exported).hexdigest() == hashlib.sha256(Path(reference.teacher_path).read_bytes()).hexdigest()

    manifests = list_manifests(out)
    assert [(m["status"], m["notes"]["resumed_from"]) for m in manifests] == [("ok", 0), ("ok", 2)]
    assert result_of_run(out) == resumed
    fs, path = resolve(out)
    assert fs.exists(f"{path}/config.yaml")
