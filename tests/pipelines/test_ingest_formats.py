"""Every file of a folder is accounted for: it lands in ``pool`` exactly once, usable or with an
``errors`` row, whatever its extension (none, a wrong one, one of a format the decoder reads but the
old extension list did not: AVIF, ICO, MPO, PNM).

The corpus is written here with Pillow: each format the decoder reads, the same bytes under a wrong
or no extension, formats it does not read (TGA, PCX, QOI), truncations, and files that are no image.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from catalog.decode import WEB_FORMATS
from catalog.sql import query
from pipelines.stage import run_stage
from pipelines.stages.ingest import IngestConfig

# (file name, Pillow format, mode, save options): all formats the decoder opens (WEB_FORMATS)
READABLE = [
    ("photo.jpg", "JPEG", "RGB", {}), ("pic.png", "PNG", "RGBA", {}), ("anim.gif", "GIF", "P", {}),
    ("web.webp", "WEBP", "RGB", {}), ("new.avif", "AVIF", "RGB", {}), ("bitmap.bmp", "BMP", "RGB", {}),
    ("scan.tiff", "TIFF", "RGB", {}), ("favicon.ico", "ICO", "RGBA", {}), ("colour.ppm", "PPM", "RGB", {}),
    ("grey.pgm", "PPM", "L", {}), ("mono.pbm", "PPM", "1", {}),
    ("stereo.mpo", "MPO", "RGB", {"save_all": True, "append_images": [Image.new("RGB", (48, 40), (9, 9, 9))]}),
]
UNREAD = [("old.tga", "TGA"), ("paint.pcx", "PCX"), ("quite.qoi", "QOI")]


def _encode(fmt: str, mode: str, options: dict) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", (48, 40), (200, 60, 30))
    image.paste((20, 90, 220), (10, 8, 30, 30))
    image.convert(mode).save(out, fmt, **options)
    return out.getvalue()


def _corpus(folder: Path) -> tuple[set[str], set[str]]:
    """Write the corpus; returns (paths that must be usable, paths that must be errors)."""
    usable, broken = set(), set()

    def put(name: str, data: bytes, target: set[str]) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        target.add(str(path))

    for name, fmt, mode, options in READABLE:
        assert fmt in WEB_FORMATS or fmt == "MPO"
        data = _encode(fmt, mode, options)
        put(name, data, usable)
        put(f"renamed/{name}.txt", data, usable)  # a wrong extension
        put(f"bare/{name.split('.')[0]}", data, usable)  # none at all
        put(f"cut/{name}", data[: len(data) // 2], broken)
    for name, fmt in UNREAD:
        put(name, _encode(fmt, "RGB", {}), broken)
    put("empty.jpg", b"", broken)
    put("notes.md", b"# not an image\n", broken)
    put("blob.bin", bytes(range(256)) * 4, broken)
    put("page.html", b"<!doctype html><html><body>404</body></html>", broken)
    return usable, broken


def test_every_file_lands_in_pool_once_and_the_decoder_decides(tmp_path):
    folder = tmp_path / "corpus"
    usable, broken = _corpus(folder)
    root = str(tmp_path / "cat")
    run_stage("ingest", root, IngestConfig(source=str(folder), files_per_unit=16))

    pool = query(root, "SELECT uri, status, format FROM pool").to_pylist()
    errors = query(root, "SELECT uri, reason FROM errors").to_pylist()
    uris = [r["uri"] for r in pool]
    assert sorted(uris) == sorted(usable | broken)  # every file, exactly once
    status = {r["uri"]: r["status"] for r in pool}
    assert {u for u, s in status.items() if s == "ok"} == usable
    assert sorted(r["uri"] for r in errors) == sorted(broken)  # one errors row per unusable file
    formats = {r["format"] for r in pool if r["status"] == "ok"}
    assert {"AVIF", "ICO", "MPO", "PPM"} <= formats
    reasons = {r["uri"].rsplit("/", 1)[1]: r["reason"] for r in errors}
    assert reasons["blob.bin"] == "not_an_image" and reasons["notes.md"] == "text_file"
    assert reasons["empty.jpg"] == "empty_file" and reasons["page.html"] == "html_page"
