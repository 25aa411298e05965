"""Files of the site: data files (JSON wrapped in one function call) and the static assets.

Browsers refuse ``fetch`` of ``file://`` URLs, but load scripts from them; so each data file is a
script whose body is one JSON document passed to ``curateData(key, …)`` (defined in ``app.js``). The
same files work from a web server or a bucket's static hosting.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from itertools import islice

from catalog.paths import join, write_bytes_atomic

STATIC_FILES = ("index.html", "app.js", "style.css")
DATA_DIR = "data"


def data_url(site: str, key: str) -> str:
    return join(site, DATA_DIR, f"{key}.js")


def data_file(key: str, json_text: str) -> bytes:
    return f"curateData({json.dumps(key)}, {json_text});\n".encode()


def write_data(site: str, key: str, json_text: str) -> int:
    """Write one data file; returns its size in bytes."""
    body = data_file(key, json_text)
    write_bytes_atomic(data_url(site, key), body)
    return len(body)


def write_many(site: str, items: Iterable[tuple[str, str]], threads: int = 8, chunk: int = 512) -> tuple[int, int]:
    """Write ``(key, json)`` data files with a few threads (tens of thousands of small files at scale),
    ``chunk`` at a time so memory holds one chunk; returns how many and the largest size."""
    count = largest = 0
    items = iter(items)
    with ThreadPoolExecutor(threads) as pool:
        while block := list(islice(items, chunk)):
            sizes = list(pool.map(lambda kv: write_data(site, *kv), block))
            count += len(sizes)
            largest = max(largest, *sizes)
    return count, largest


def copy_static(site: str) -> None:
    """index.html, app.js and style.css from the package's ``static/`` folder."""
    static = resources.files("pipelines.explore").joinpath("static")
    for name in STATIC_FILES:
        write_bytes_atomic(join(site, name), static.joinpath(name).read_bytes())
