import sys; sys.path.insert(0, "/work/main")
from tests.test_s3 import *  # noqa
from tests.test_s3 import s3, BUCKET  # noqa
import io, numpy as np, pyarrow as pa
from catalog.shards import write_shards, shard_urls
from catalog.ledger import Ledger
from catalog.tables import list_tables
from catalog.array_store import CatalogArrayStore
from catalog.sql import query

def test_stale(s3):
    import s3fs
    root = f"s3://{BUCKET}/fresh"
    t = pa.table({"image_id": pa.array([1, 2], pa.int64())})
    write_shards(root, "t", "a", t)
    Ledger(root, "st").mark("u1")
    store = CatalogArrayStore(root, "c")
    assert store.get("k") is None
    assert len(shard_urls(root, "t")) == 1 and set(Ledger(root, "st").done()) == {"u1"}
    assert list_tables(root) == ["t"] and not Ledger(root, "st").is_complete()
    other = s3fs.S3FileSystem(skip_instance_cache=True)
    sink = pa.BufferOutputStream(); pq.write_table(t, sink)
    other.pipe_file(f"{BUCKET}/fresh/t/b-00000.parquet", sink.getvalue().to_pybytes())
    other.pipe_file(f"{BUCKET}/fresh/u/c-00000.parquet", sink.getvalue().to_pybytes())
    other.pipe_file(f"{BUCKET}/fresh/_ledger/st/u2.json", b"{}")
    other.pipe_file(f"{BUCKET}/fresh/_ledger/st/_complete.json", b"{}")
    buf = io.BytesIO(); np.savez(buf, a=np.arange(3)); other.pipe_file(f"{BUCKET}/fresh/_checkpoints/c/k.npz", buf.getvalue())
    res = {}
    res["shards"] = len(shard_urls(root, "t"))
    res["done"] = sorted(Ledger(root, "st").done())
    res["complete"] = Ledger(root, "st").is_complete()
    res["tables"] = list_tables(root)
    res["store"] = store.get("k") is not None
    res["sql"] = query(root, "SELECT count(*) FROM t").column(0)[0].as_py()
    print(res)
    assert res == {"shards": 2, "done": ["u1", "u2"], "complete": True, "tables": ["t", "u"], "store": True, "sql": 4}
