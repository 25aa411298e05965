"""`curate explore` in a real browser: headless Chromium (Debian's package, driven by Selenium through
Debian's chromedriver) loads the site from file:// and the DOM is checked against `curate sql`.

Screenshots are saved under the pytest temporary folder (printed at the end of the session) and
checked to be non-blank. Every test ends with no JavaScript console error.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from tests.helpers import free_ports, run_cli

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000"]


def ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver when missing; fail (not skip) when that cannot be done."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    try:
        proc = subprocess.run(["bash", "-c", INSTALL], check=False, capture_output=True, text=True, timeout=1200)
        detail = proc.stderr[-2000:]
    except (OSError, subprocess.TimeoutExpired) as e:
        detail = str(e)
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"the explore browser tests need headless Chromium ({CHROMIUM}, {CHROMEDRIVER}), which "
                    f"could not be installed with `{INSTALL}` (run it as root):\n{detail}", pytrace=False)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument("--user-data-dir=" + tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def no_console_errors(browser):
    browser.get_log("browser")  # drop what earlier tests left
    yield
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, f"JavaScript console errors: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("explore_screenshots"))


def open_page(browser, site: str, route: str, base: str | None = None) -> None:
    """Load ``index.html#route`` from disk (or from ``base``, a server's URL) and wait until the app has
    rendered it (or shown an error)."""
    from selenium.webdriver.common.by import By

    browser.get("about:blank")
    browser.get((base or "file://" + site) + "/index.html" + route)
    wait_ready(browser, route)
    errors = browser.find_elements(By.CSS_SELECTOR, "#main .error")
    assert not errors, errors[0].text


def wait_ready(browser, route: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "main").get_attribute("data-ready") == route
        or d.find_elements(By.CSS_SELECTOR, "#main .error"))


def number(text: str) -> int:
    return int(text.split(" ")[0].replace(",", ""))


def sql(root: str, query: str) -> list[dict[str, str]]:
    result = run_cli(["sql", query, "--catalog", root, "--format", "csv"])
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def sql_value(root: str, query: str) -> int:
    (row,) = sql(root, query)
    return int(next(iter(row.values())))


def rows(browser, depth: int | None = None) -> list[dict]:
    from selenium.webdriver.common.by import By

    selector = "tr.node-row" + ("" if depth is None else f'[data-depth="{depth}"]')
    return [{"level": int(r.get_attribute("data-level")), "id": int(r.get_attribute("data-id")),
             "pool": number(r.find_element(By.CSS_SELECTOR, "td.pool").text),
             "curated": number(r.find_element(By.CSS_SELECTOR, "td.curated-count").text), "element": r}
            for r in browser.find_elements(By.CSS_SELECTOR, selector)]


def assert_not_blank(path: str) -> None:
    """A blank page is one colour: ask for spread and for many grey levels (text, thumbnails)."""
    grey = np.asarray(Image.open(path).convert("L"))
    levels = len(np.unique(grey))
    assert grey.std() > 8 and levels > 64, f"{path} looks blank (pixel std {grey.std():.1f}, {levels} grey levels)"


def screenshot(browser, shots: str, name: str) -> str:
    """Save a screenshot, check it is not blank, and check every sprite sheet on the page loaded."""
    path = os.path.join(shots, f"{name}.png")
    browser.save_screenshot(path)
    assert_not_blank(path)
    widths = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const urls = [...new Set([...document.querySelectorAll('.thumb')]
            .map((e) => getComputedStyle(e).backgroundImage).filter((u) => u.startsWith('url(')))];
        Promise.all(urls.map((u) => new Promise((resolve) => {
            const img = new Image();
            img.onload = () => resolve(img.naturalWidth);
            img.onerror = () => resolve(0);
            img.src = u.slice(5, -2);
        }))).then(done);""")
    assert widths and set(widths) == {640}, f"{name}: sprite sheets that did not load: {widths}"
    return path


def test_top_level_lists_every_top_cluster_with_the_sizes_sql_gives(browser, explore_site, explore_catalog, shots):
    open_page(browser, explore_site, "#/")
    shown = rows(browser, depth=0)
    pool = {int(r["l5"]): int(r["n"]) for r in sql(explore_catalog, "SELECT l5, count(*) AS n FROM clusters GROUP BY 1")}
    curated = {int(r["l5"]): int(r["n"]) for r in sql(explore_catalog, "SELECT l5, count(*) AS n FROM curated_lvd GROUP BY 1")}
    assert {r["id"]: r["pool"] for r in shown} == pool and len(shown) == len(pool)
    assert {r["id"]: r["curated"] for r in shown} == {k: curated.get(k, 0) for k in pool}
    assert [r["pool"] for r in shown] == sorted(pool.values(), reverse=True)
    screenshot(browser, shots, "tree")


def test_clicking_into_a_node_shows_its_children(browser, explore_site, explore_catalog, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, explore_site, "#/")
    top = rows(browser, depth=0)[0]
    children = {int(r["l4"]): int(r["n"]) for r in sql(
        explore_catalog, f"SELECT l4, count(*) AS n FROM clusters WHERE l5 = {top['id']} GROUP BY 1")}
    top["element"].find_element(By.CSS_SELECTOR, "button.toggle").click()  # expands in place, once loaded
    WebDriverWait(browser, 30).until(lambda d: top["element"].get_attribute("data-open") == "1")
    expanded = rows(browser, depth=1)
    assert {r["id"]: r["pool"] for r in expanded} == children and {r["level"] for r in expanded} == {4}

    top["element"].find_element(By.CSS_SELECTOR, "a.node-link").click()  # opens the cluster page
    wait_ready(browser, f"#/node/5/{top['id']}")
    assert number(browser.find_element(By.ID, "node-pool").text) == top["pool"]
    assert {r["id"]: r["pool"] for r in rows(browser)} == children
    largest = max(children, key=lambda k: (children[k], -k))
    rows(browser)[0]["element"].find_element(By.CSS_SELECTOR, "a.node-link").click()
    wait_ready(browser, f"#/node/4/{largest}")
    grandchildren = {int(r["l3"]): int(r["n"]) for r in sql(
        explore_catalog, f"SELECT l3, count(*) AS n FROM clusters WHERE l4 = {largest} GROUP BY 1")}
    assert {r["id"]: r["pool"] for r in rows(browser)} == grandchildren
    crumbs = [a.text for a in browser.find_elements(By.CSS_SELECTOR, ".breadcrumb a")]
    assert crumbs == ["top", f"L5 · {top['id']}"]
    screenshot(browser, shots, "node")


def test_duplicates_page_shows_each_groups_kept_image_first(browser, explore_site, explore_catalog, shots):
    from selenium.webdriver.common.by import By

    open_page(browser, explore_site, "#/duplicates/0")
    groups = browser.find_elements(By.CSS_SELECTOR, ".dup-group")
    assert groups
    removed_by = {}
    for r in sql(explore_catalog, "SELECT image_id::VARCHAR AS i, kept_id::VARCHAR AS k FROM duplicates"):
        removed_by.setdefault(r["k"], set()).add(r["i"])
    for group in groups:
        kept = group.get_attribute("data-kept")
        ids = [t.get_attribute("data-id") for t in group.find_elements(By.CSS_SELECTOR, ".thumb")]
        assert ids[0] == kept and "kept" in group.find_element(By.CSS_SELECTOR, "figure").get_attribute("class")
        assert set(ids[1:]) <= removed_by[kept] and len(ids) - 1 == min(12, len(removed_by[kept]))
    screenshot(browser, shots, "duplicates")


def test_search_finds_an_image_by_id_and_by_uri(browser, explore_site, explore_catalog, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    (row,) = sql(explore_catalog, "SELECT c.image_id::VARCHAR AS i, p.uri, c.l1, c.l5 FROM curated_lvd c "
                                  "JOIN pool p USING (image_id) ORDER BY c.image_id LIMIT 1")
    open_page(browser, explore_site, "#/")
    box = browser.find_element(By.ID, "search-input")
    box.send_keys(row["i"], Keys.ENTER)
    wait_ready(browser, "#/search/" + row["i"])
    (hit,) = browser.find_elements(By.CSS_SELECTOR, ".search-result")
    assert hit.get_attribute("data-id") == row["i"] and row["uri"] in hit.text and "curated: lvd" in hit.text
    links = [a.get_attribute("href").split("#")[1] for a in hit.find_elements(By.CSS_SELECTOR, "a.node-link")]
    assert links[0] == f"/node/5/{row['l5']}" and links[-1] == f"/node/1/{row['l1']}"
    screenshot(browser, shots, "search")

    name = os.path.basename(row["uri"])
    open_page(browser, explore_site, "#/search/" + urllib.parse.quote(name))
    assert row["i"] in [h.get_attribute("data-id") for h in browser.find_elements(By.CSS_SELECTOR, ".search-result")]


def test_ten_numbers_the_site_shows_match_curate_sql(browser, explore_site, explore_catalog):
    from selenium.webdriver.common.by import By

    seen, expect = [], []
    open_page(browser, explore_site, "#/")
    seen.append(number(browser.find_element(By.ID, "clustered-total").text))
    expect.append(sql_value(explore_catalog, "SELECT count(*) FROM clusters"))
    top = rows(browser, depth=0)
    for r in top[:3]:
        seen.append(r["pool"])
        expect.append(sql_value(explore_catalog, f"SELECT count(*) FROM clusters WHERE l5 = {r['id']}"))
    seen.append(top[-1]["curated"])
    expect.append(sql_value(explore_catalog, f"SELECT count(*) FROM curated_lvd WHERE l5 = {top[-1]['id']}"))

    with_dups = sql(explore_catalog, "SELECT c.l2 AS id FROM duplicates d JOIN clusters c ON c.image_id = d.kept_id "
                                     "GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")[0]["id"]
    open_page(browser, explore_site, f"#/node/2/{with_dups}")
    seen.append(number(browser.find_element(By.ID, "node-pool").text))
    expect.append(sql_value(explore_catalog, f"SELECT count(*) FROM clusters WHERE l2 = {with_dups}"))
    seen.append(number(browser.find_element(By.ID, "node-dups").text))
    expect.append(sql_value(explore_catalog, "SELECT count(*) FROM duplicates d JOIN clusters c ON c.image_id = d.kept_id "
                                             f"WHERE c.l2 = {with_dups}"))

    open_page(browser, explore_site, "#/duplicates/0")
    for reason in ("copy", "exact"):
        seen.append(number(browser.find_element(By.CSS_SELECTOR, f'tr.dup-total[data-reason="{reason}"] td.removed').text))
        expect.append(sql_value(explore_catalog, f"SELECT count(*) FROM duplicates WHERE reason = '{reason}'"))

    open_page(browser, explore_site, "#/errors")
    cell = browser.find_element(By.CSS_SELECTOR, 'tr.error-count[data-reason="truncated"] td.num')
    seen.append(number(cell.text))
    expect.append(sql_value(explore_catalog, "SELECT count(*) FROM errors WHERE reason = 'truncated'"))
    assert len(seen) == 10 and seen == expect and all(expect)


def test_every_page_renders_without_console_errors(browser, explore_site, explore_catalog, shots):
    from selenium.webdriver.common.by import By

    leaf = sql_value(explore_catalog, "SELECT min(l1) FROM clusters")
    for route, name in (("#/errors", "errors"), ("#/runs", "runs"), ("#/retrieval", None), (f"#/node/1/{leaf}", "level1")):
        open_page(browser, explore_site, route)
        assert browser.find_element(By.TAG_NAME, "h1").text
        if name:
            path = os.path.join(shots, f"{name}.png")
            browser.save_screenshot(path)
            assert_not_blank(path)
        if name == "runs":  # ingest, embed, dedup, cluster, sample
            assert len(browser.find_elements(By.CSS_SELECTOR, "tr.run")) >= 5


def test_the_same_site_works_from_a_static_web_server(browser, explore_site, explore_catalog):
    from selenium.webdriver.common.by import By

    (port,) = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", explore_site], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "http.server did not start"
                time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        open_page(browser, explore_site, "#/", base)
        pool = {int(r["l5"]): int(r["n"]) for r in sql(explore_catalog, "SELECT l5, count(*) AS n FROM clusters GROUP BY 1")}
        assert {r["id"]: r["pool"] for r in rows(browser, depth=0)} == pool
        open_page(browser, explore_site, "#/duplicates/0", base)
        assert browser.find_elements(By.CSS_SELECTOR, ".dup-group .thumb")
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_retrieval_page_shows_each_seed_image_before_what_it_retrieved(browser, explore_catalog, demo_pool,
                                                                      tmp_path, shots):
    from selenium.webdriver.common.by import By

    root = str(tmp_path / "cat")
    shutil.copytree(explore_catalog, root)
    seed_dir = tmp_path / "seed"  # a few seed images keep the seed's ingest and embedding short
    seed_dir.mkdir()
    for path in sorted(glob.glob(os.path.join(demo_pool, "seed", "**", "*.jpg"), recursive=True))[:24]:
        shutil.copy(path, seed_dir)
    seeds = f"seeds.seeds={{demo: {{images: {seed_dir}}}}}"
    result = run_cli(["retrieve", "--catalog", root, "--seed", "demo", "--mode", "knn", "--k", "3", "--set", seeds])
    assert result.returncode == 0, result.stderr
    site = str(tmp_path / "site")
    assert run_cli(["explore", root, "--out", site]).returncode == 0
    open_page(browser, site, "#/retrieval/0")
    retrieved = {}
    for r in sql(root, "SELECT seed_image_id::VARCHAR AS s, image_id::VARCHAR AS i FROM retrieved ORDER BY rank, image_id"):
        retrieved.setdefault(r["s"], []).append(r["i"])
    groups = browser.find_elements(By.CSS_SELECTOR, ".retrieval-group")
    assert len(groups) == min(40, len(retrieved))
    for group in groups:
        ids = [t.get_attribute("data-id") for t in group.find_elements(By.CSS_SELECTOR, ".thumb")]
        assert ids[1:] == retrieved[ids[0]][:8]  # the seed image, then its neighbours by rank
        captions = [c.text for c in group.find_elements(By.CSS_SELECTOR, "figcaption")]
        ranks = [int(c.split(" ")[0][1:]) for c in captions[1:]]
        assert captions[0] == "seed" and ranks == sorted(ranks)
    screenshot(browser, shots, "retrieval")
