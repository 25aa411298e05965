"""`curate explore`'s data: every node file against DuckDB over the catalog, thumbnails against the
images they show, caps, the thumbnails stage's reruns and its resume after a kill. The browser side is
tests/e2e/test_explore.py."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from catalog.decode import decode_rgb
from catalog.ledger import Ledger, LedgerPlanError
from catalog.shards import read_table
from catalog.sql import query
from pipelines.explore.config import ExploreConfig
from pipelines.explore.site import build_thumbnails
from pipelines.stages.thumbnails import INDEX_TABLE
from tests.helpers import kill_when, run_cli, still_alive

WRAPPER = re.compile(r'^curateData\("([^"]+)", (.*)\);\n$', re.DOTALL)


def read_data(site: str, key: str):
    """A data file's JSON, after checking the wrapper names its own key."""
    with open(os.path.join(site, "data", f"{key}.js")) as f:
        match = WRAPPER.match(f.read())
    assert match and match.group(1) == key
    return json.loads(match.group(2))


def node_files(site: str) -> dict[tuple[int, int], dict]:
    out = {}
    for path in glob.glob(os.path.join(site, "data", "nodes", "l*", "*.js")):
        level, node = int(path.split(os.sep)[-2][1:]), int(os.path.basename(path)[:-3])
        out[(level, node)] = read_data(site, f"nodes/l{level}/{node}")
    return out


def sql_pairs(root: str, sql: str) -> dict:
    t = query(root, sql)
    return dict(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))


@pytest.fixture(scope="module")
def nodes(explore_site) -> dict[tuple[int, int], dict]:
    return node_files(explore_site)


def test_every_node_has_a_file_with_the_sizes_sql_gives(explore_catalog, explore_site, nodes):
    summary = read_data(explore_site, "summary")
    n_levels = summary["n_levels"]
    assert n_levels == 5 and [p["name"] for p in summary["parts"]] == ["lvd"]
    for level in range(1, n_levels + 1):
        pool = sql_pairs(explore_catalog, f"SELECT l{level}, count(*) FROM clusters GROUP BY 1")
        curated = sql_pairs(explore_catalog, f"SELECT l{level}, count(*) FROM curated_lvd GROUP BY 1")
        dups = sql_pairs(explore_catalog, f"SELECT c.l{level}, count(*) FROM duplicates d JOIN clusters c "
                                      "ON c.image_id = d.kept_id GROUP BY 1")
        mine = {k[1]: v for k, v in nodes.items() if k[0] == level}
        assert set(mine) == set(pool)
        assert {i: n["pool"] for i, n in mine.items()} == pool
        assert {i: n["curated"][0] for i, n in mine.items() if n["curated"][0]} == curated
        assert {i: n["dups"] for i, n in mine.items() if n["dups"]} == dups
        for node in mine.values():
            if level > 1:
                assert sum(c["pool"] for c in node["children"]) == node["pool"]
            else:
                assert node["children"] == [] and node["n_children"] == 0
            assert [c["pool"] for c in node["children"]] == sorted((c["pool"] for c in node["children"]), reverse=True)
            assert len(node["path"]) == n_levels - level
    top = sql_pairs(explore_catalog, f"SELECT l{n_levels}, count(*) FROM clusters GROUP BY 1")
    assert {c["id"]: c["pool"] for c in summary["top"]} == top and summary["n_top"] == len(top)


def test_strips_are_closest_to_the_centroid_then_random(explore_catalog, nodes):
    config = ExploreConfig()
    l1_below = {level: sql_pairs(explore_catalog, f"SELECT l{level}, count(DISTINCT l1) FROM clusters GROUP BY 1")
                for level in range(2, 6)}
    by_distance: dict[int, list[int]] = {}
    for r in query(explore_catalog, "SELECT l1, image_id FROM clusters ORDER BY distance, image_id").to_pylist():
        by_distance.setdefault(r["l1"], []).append(r["image_id"])
    for (level, node_id), node in nodes.items():
        ids = [int(img["i"]) for img in node["strip"]]
        if level == 1:
            assert ids == by_distance[node_id][:config.central]
        else:  # one image per level-1 descendant
            assert len(ids) == len(set(ids)) == min(config.central, l1_below[level][node_id])
        randoms = [int(img["i"]) for img in node["random"]]
        assert not set(randoms) & set(ids) and len(randoms) == min(config.random, node["pool"] - len(ids))
    # level 2: the level-1 children whose centroids are nearest (cosine) its centroid, each by its own best member
    cents = query(explore_catalog, "SELECT level, cluster_id, centroid FROM centroids WHERE level <= 2").to_pylist()
    unit = {(r["level"], r["cluster_id"]): np.asarray(r["centroid"]) / np.linalg.norm(r["centroid"]) for r in cents}
    best = sql_pairs(explore_catalog, "SELECT l1, arg_min(image_id, (distance, image_id)) FROM clusters GROUP BY 1")
    for (level, node_id), node in list(nodes.items()):
        if level != 2:
            continue
        children = [c["id"] for c in node["children"]]
        ranked = sorted(children, key=lambda c: (-float(unit[(1, c)] @ unit[(2, node_id)]), c))
        assert [int(img["i"]) for img in node["strip"]] == [best[c] for c in ranked[:config.central]]


def test_members_duplicates_and_neighbours_of_a_node(explore_catalog, nodes):
    curated = set(query(explore_catalog, "SELECT image_id FROM curated_lvd").column(0).to_pylist())
    removed = sql_pairs(explore_catalog, "SELECT image_id, kept_id FROM duplicates")
    members_of: dict[tuple[int, int], set[int]] = {}
    for r in query(explore_catalog, "SELECT * FROM clusters").to_pylist():
        for level in range(1, 6):
            members_of.setdefault((level, r[f"l{level}"]), set()).add(r["image_id"])
    for (level, node_id), node in nodes.items():
        members = members_of[(level, node_id)]
        shown = [int(m["i"]) for m in node["members"]]
        assert set(shown) <= set(members) and len(shown) == len(set(shown)) <= 24
        assert all((int(m["i"]) in curated) == (m["p"] == [0]) for m in node["members"])
        flags = [bool(m["p"]) for m in node["members"]]
        assert flags == sorted(flags, reverse=True)  # curated ones first
        for d in node["duplicates"]:
            assert removed[int(d["removed"]["i"])] == int(d["kept"]["i"]) and int(d["kept"]["i"]) in members
        assert len(node["duplicates"]) == min(node["dups"], 8)
        same_level = {k[1] for k in nodes if k[0] == level}
        assert all(b["id"] in same_level and b["id"] != node_id for b in node["neighbours"])
        sims = [b["similarity"] for b in node["neighbours"]]
        assert sims == sorted(sims, reverse=True) and len(sims) == min(6, len(same_level) - 1)


def fitted(img: Image.Image, size: int) -> Image.Image:
    """The image shrunk (never enlarged) to fit a size² cell, centred on the sheets' light grey."""
    scale = min(1.0, size / max(img.size))
    small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (size, size), (236, 236, 236))
    cell.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
    return cell


def blocks(a: np.ndarray, n: int = 8) -> np.ndarray:
    h, w, c = a.shape
    return a.reshape(n, h // n, n, w // n, c).mean(axis=(1, 3))


def test_thumbnails_show_the_images_they_name(explore_site, nodes):
    summary = read_data(explore_site, "summary")
    size, cols = summary["thumb"]["size"], summary["thumb"]["cols"]
    images = {img["i"]: img for node in nodes.values() for img in node["strip"] + node["members"]}
    sheets: dict[str, np.ndarray] = {}
    for img in list(images.values())[::25]:
        if img["s"] not in sheets:
            sheets[img["s"]] = np.asarray(Image.open(os.path.join(explore_site, "thumbs", img["s"] + ".jpg")).convert("RGB"))
        x, y = (img["c"] % cols) * size, (img["c"] // cols) * size
        cell = sheets[img["s"]][y:y + size, x:x + size].astype(np.float32)
        with open(img["u"], "rb") as f:
            expect = np.asarray(fitted(decode_rgb(f.read()), size), np.float32)
        diff = np.abs(blocks(cell) - blocks(expect)).mean()  # 8x8 means: blind to the resampling filter
        assert diff < 12, (img["u"], diff)
    assert all(img["s"] for img in images.values())  # every shown demo image decodes


def test_pages_stay_small_and_search_covers_the_pool(explore_catalog, explore_site):
    sizes = [os.path.getsize(p) for p in glob.glob(os.path.join(explore_site, "data", "**", "*.js"), recursive=True)]
    assert max(sizes) < 2_000_000
    summary = read_data(explore_site, "summary")
    n = summary["search"]["shards"]
    seen = {}
    for shard in range(n):
        for row in read_data(explore_site, f"search/{shard}"):
            assert ((int(row[0]) % n) + n) % n == shard  # Python's % is floored: same residue as app.js
            seen[row[0]] = row
    pool = sql_pairs(explore_catalog, "SELECT image_id::VARCHAR, uri FROM pool")
    assert {k: v[1] for k, v in seen.items()} == pool
    clusters = query(explore_catalog, "SELECT image_id::VARCHAR AS i, [l1, l2, l3, l4, l5] AS c FROM clusters").to_pylist()
    assert all(seen[r["i"]][3] == r["c"] for r in clusters)


def test_duplicate_pages_list_every_group_kept_first(explore_catalog, explore_site):
    summary = read_data(explore_site, "summary")
    groups = [g for page in range(summary["duplicates"]["pages"]) for g in read_data(explore_site, f"dups/{page}")]
    expect = query(explore_catalog, "SELECT kept_id::VARCHAR AS k, reason, count(*) AS n FROM duplicates GROUP BY ALL").to_pylist()
    assert sorted((g["kept"]["i"], g["reason"], g["n"]) for g in groups) == sorted((e["k"], e["reason"], e["n"]) for e in expect)
    removed = sql_pairs(explore_catalog, "SELECT image_id::VARCHAR, kept_id::VARCHAR FROM duplicates")
    for g in groups:
        assert all(removed[r["img"]["i"]] == g["kept"]["i"] for r in g["removed"])
    assert [g["n"] for g in groups] == sorted((g["n"] for g in groups), reverse=True)


def test_a_rebuild_reuses_every_thumbnail(explore_catalog, explore_site, nodes, tmp_path):
    again = str(tmp_path / "site")
    shutil.copytree(explore_site, again)
    result = run_cli(["explore", explore_catalog, "--out", again])
    assert result.returncode == 0, result.stderr
    assert " 0 thumbnails built in this run" in result.stdout
    assert node_files(again) == nodes


def test_caps_bound_every_page(explore_catalog, tmp_path):
    out = str(tmp_path / "explore_site")
    caps = ["central=2", "random=1", "members=4", "max_children=2", "child_thumbs=1", "neighbours=1",
            "node_duplicates=1", "dup_groups=3", "dup_groups_per_page=2", "deepest_level=3"]
    result = run_cli(["explore", explore_catalog, "--out", out, "--set", *caps])
    assert result.returncode == 0, result.stderr
    nodes = node_files(out)
    assert {level for level, _ in nodes} == {3, 4, 5}
    for node in nodes.values():
        assert len(node["strip"]) <= 2 and len(node["random"]) <= 1 and len(node["members"]) <= 4
        assert len(node["children"]) == min(2, node["n_children"]) and len(node["neighbours"]) <= 1
        assert all(len(c["thumbs"]) <= 1 for c in node["children"]) and len(node["duplicates"]) <= 1
    summary = read_data(out, "summary")
    assert summary["duplicates"]["groups"] == 3 and summary["duplicates"]["pages"] == 2
    assert len(read_data(out, "dups/1")) == 1


def _four_images(demo_pool: str, tmp_path) -> list[str]:
    good = sorted(glob.glob(os.path.join(demo_pool, "seed", "**", "*.jpg"), recursive=True))[:2]
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    return [good[0], str(tmp_path / "gone.jpg"), str(text), good[1]]


def _statuses(index) -> dict[int, str]:
    return dict(zip(index.column("image_id").to_pylist(), index.column("status").to_pylist()))


SMALL = ExploreConfig(thumb_size=32, sheet_cols=1)  # a sheet per image


def test_unusable_images_get_a_reason_not_a_crash(demo_pool, tmp_path):
    uris = _four_images(demo_pool, tmp_path)
    index, result = build_thumbnails(str(tmp_path / "explore_site"), np.arange(4, dtype=np.int64), uris, SMALL)
    assert result.summary == {"in": 4, "out": 2, "errored": 2} and result.items_run == 4
    assert _statuses(index) == {0: "ok", 1: "missing", 2: "text_file", 3: "ok"}


def test_other_images_redraw_the_sheets_and_other_settings_need_overwrite(demo_pool, tmp_path):
    site = str(tmp_path / "explore_site")
    uris = _four_images(demo_pool, tmp_path)
    ids = np.arange(4, dtype=np.int64)
    _, first = build_thumbnails(site, ids, uris, SMALL)
    before = set(os.listdir(os.path.join(site, "thumbs")))
    assert len(before) == 4 and not build_thumbnails(site, ids, uris, SMALL)[1].items_run  # done: nothing redrawn
    index, again = build_thumbnails(site, ids[[3, 0]], [uris[3], uris[0]], SMALL)  # other caps: other images
    after = set(os.listdir(os.path.join(site, "thumbs")))
    assert again.items_run == 2 and _statuses(index) == {3: "ok", 0: "ok"}
    assert len(after) == 2 and not after & before  # the old sheets are gone, the new name is new
    with pytest.raises(LedgerPlanError, match="thumb_size"):
        build_thumbnails(site, ids, uris, ExploreConfig(thumb_size=48, sheet_cols=1))
    index, bigger = build_thumbnails(site, ids, uris, ExploreConfig(thumb_size=48, sheet_cols=1), overwrite=True)
    assert bigger.items_run == 4 and len(index) == 4
    with Image.open(os.path.join(site, "thumbs", index.column("sheet")[0].as_py() + ".jpg")) as sheet:
        assert sheet.size == (48, 48)


def test_explore_refuses_a_catalog_without_clusters(demo_catalog, explore_catalog, tmp_path):
    result = run_cli(["explore", demo_catalog, "--out", str(tmp_path / "a")])
    assert result.returncode == 2 and "has no clusters, centroids table" in result.stderr
    result = run_cli(["explore", explore_catalog, "--out", str(tmp_path / "b"), "--set", "deepest_level=6"])
    assert result.returncode == 2 and "deepest_level=6 but the catalog has 5 levels" in result.stderr
    result = run_cli(["explore", explore_catalog, "--out", str(tmp_path / "c"), "--set", "jpeg_quality=0"])
    assert result.returncode == 2 and "jpeg_quality must be in 1..95" in result.stderr


@pytest.mark.slow
def test_a_killed_build_on_ray_resumes_without_redoing_finished_sheets(explore_catalog, tmp_path):
    out = str(tmp_path / "site")
    args = ["explore", explore_catalog, "--out", out, "--set", "sheet_cols=2"]  # units of 32 images
    ledger = Ledger(out, "thumbnails")
    started = kill_when([*args, "--executor", "ray"], lambda: len(ledger.done()) >= 3, only_driver=True)
    assert not still_alive(started, 20), "Ray processes outlived the killed build"
    drawn_by = {int(m["worker"].rsplit(":", 1)[1]) for m in ledger.done().values()}
    assert drawn_by <= {p.pid for p in started}  # Ray workers of the build drew the sheets, not the driver
    finished = set(ledger.done())
    assert not os.path.exists(os.path.join(out, "index.html"))  # killed before the pages
    done_images = sum(m["rows"][INDEX_TABLE] for m in ledger.done().values())
    result = run_cli([*args, "--executor", "local"])  # the executor is no setting: the same run resumes
    assert result.returncode == 0, result.stderr
    assert finished < set(ledger.done())  # earlier units kept, the rest added
    shown = int(re.search(r"(\d+) images shown", result.stdout).group(1))
    built = int(re.search(r"(\d+) thumbnails built in this run", result.stdout).group(1))
    assert built == shown - done_images > 0  # nothing finished before the kill is redone
    ids = read_table(out, INDEX_TABLE).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == shown  # one row per shown image, none twice
    sheets = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(out, "thumbs", "*.jpg"))}
    refs = {img["s"] for node in node_files(out).values() for img in node["strip"] + node["members"]}
    assert refs <= sheets
