"""One bad item never aborts a stage: each way an item's URI or bytes can fail becomes an ``errors`` row
with its reason, and the stage finishes with the good items beside it in ``pool``.

Every case is a row of a Parquet list given to ``curate ingest``; the same reading path (``read_item``)
is what ``embed`` and ``pack`` use, so each case is also read through it directly.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalog.decode import MISSING
from catalog.images import ACCESS_DENIED, BAD_URI, UNREADABLE, UnreadableItem, read_item
from catalog.sql import query
from pipelines.stage import run_stage
from pipelines.stages.ingest import IngestConfig


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_items")
    good, jpeg = root / "good.png", root / "not_parquet.png"
    good.write_bytes(_png((10, 200, 30)))
    jpeg.write_bytes(_png((200, 10, 30)))
    return {"root": str(root), "good": str(good), "not_parquet": str(jpeg)}


def _cases(files: dict[str, str]) -> dict[str, tuple[str | None, str]]:
    """case -> (uri, the reason its errors row must give)."""
    return {
        "null_uri": (None, BAD_URI),
        "s3_without_credentials": ("s3://curate-no-such-bucket/a.jpg", ACCESS_DENIED),
        "gs_without_gcsfs": ("gs://curate-no-such-bucket/a.jpg", UNREADABLE),
        "row_on_non_parquet": (f"{files['not_parquet']}#row=0&column=bytes", BAD_URI),
        "tar_chain_on_non_tar": (f"tar://a.jpg::{files['not_parquet']}", UNREADABLE),
        "bad_size": (f"{files['good']}#offset=0&size=zz", BAD_URI),
        "gone": (f"{files['root']}/vanished.png", MISSING),
    }


def _without_aws_credentials(mp: pytest.MonkeyPatch, tmp: Path) -> None:
    """No credentials anywhere botocore looks (and no metadata service to ask)."""
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        mp.delenv(key, raising=False)
    for key in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        mp.setenv(key, str(tmp / "none"))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture()
def no_aws_credentials(monkeypatch, tmp_path):
    _without_aws_credentials(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def ingested(files, tmp_path_factory):
    """One ingest of a list holding every bad case and one good image; the list and the catalog."""
    mp, tmp = pytest.MonkeyPatch(), tmp_path_factory.mktemp("nocreds")
    _without_aws_credentials(mp, tmp)
    cases = _cases(files)
    source = Path(files["root"]) / "list.parquet"
    pq.write_table(pa.table({"uri": [files["good"], *(uri for uri, _ in cases.values())]}), source)
    root = str(tmp / "cat")
    try:
        result = run_stage("ingest", root, IngestConfig(source=str(source), files_per_unit=3))
    finally:
        mp.undo()
    return root, result, cases


def _errors(root: str) -> dict[str, dict]:
    return {r["uri"]: r for r in query(root, "SELECT uri, stage, reason, message FROM errors").to_pylist()}


@pytest.mark.parametrize("case", list(_cases({"root": "", "good": "", "not_parquet": ""})))
def test_each_bad_uri_is_an_errors_row_and_ingest_finishes(ingested, case):
    root, result, cases = ingested
    uri, reason = cases[case]
    pool = query(root, "SELECT uri, status FROM pool").to_pylist()
    assert len(pool) == 1 + len(cases) and sum(r["status"] == "ok" for r in pool) == 1
    errors = _errors(root)
    key = uri if uri is not None else next(u for u in errors if u.endswith("#row=1&column=uri"))
    assert errors[key]["reason"] == reason and errors[key]["stage"] == "ingest" and errors[key]["message"]
    assert result.summary["errored"] == len(cases)


@pytest.mark.parametrize("case", list(_cases({"root": "", "good": "", "not_parquet": ""})))
def test_read_item_used_by_embed_and_pack_gives_the_same_reason(files, no_aws_credentials, case):
    uri, reason = _cases(files)[case]
    with pytest.raises(UnreadableItem) as e:
        read_item(uri)
    assert e.value.reason == reason and str(e.value)


def test_an_integer_uri_column_is_errors_rows(files, tmp_path):
    source = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"uri": pa.array([7, 8], pa.int64())}), source)
    root = str(tmp_path / "cat")
    run_stage("ingest", root, IngestConfig(source=str(source)))
    errors = query(root, "SELECT uri, reason, message FROM errors ORDER BY uri").to_pylist()
    assert [e["reason"] for e in errors] == [BAD_URI, BAD_URI]
    assert all("int, not a string" in e["message"] for e in errors)
    assert query(root, "SELECT count(*) AS n FROM pool WHERE status = 'error'").column(0)[0].as_py() == 2


def test_a_null_inline_bytes_cell_is_an_errors_row(files, tmp_path):
    source = tmp_path / "inline.parquet"
    good = Path(files["good"]).read_bytes()
    pq.write_table(pa.table({"bytes": pa.array([good, None, good[:10]], pa.binary())}), source)
    root = str(tmp_path / "cat")
    result = run_stage("ingest", root, IngestConfig(source=str(source)))
    pool = query(root, "SELECT uri, status FROM pool ORDER BY uri").to_pylist()
    assert [r["status"] for r in pool] == ["ok", "error", "error"]
    errors = {r["uri"]: r["reason"] for r in query(root, "SELECT uri, reason FROM errors").to_pylist()}
    assert errors[f"{source}#row=1&column=bytes"] == MISSING
    assert errors[f"{source}#row=2&column=bytes"] != MISSING  # truncated bytes: the decoder's reason
    assert result.summary["errored"] == 2
