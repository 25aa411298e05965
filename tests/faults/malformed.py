"""A seeded corpus of malformed images: each of a JPEG, a PNG, a GIF and a WebP truncated at every class
of byte boundary (nothing, one byte, inside and just past the header, half, all but one), with seeded bit
flips in the header, an oversized PNG (valid header, 10^10 pixels), and files under the wrong extension.
Shared by the fault tests and ``benchmarks/faults.py``."""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image

from catalog.decode import DecodeError, decode_rgb

HEADER_BYTES = 32


def _image(fmt: str, seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (64, 48), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(40):
        img.putpixel((rng.randrange(64), rng.randrange(48)), tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def oversized_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header (with a correct CRC) claims ``width x height`` pixels over one tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def corpus(seed: int = 0, flips: int = 6) -> dict[str, bytes]:
    """File name -> bytes; names say what was done (the extension is the one a crawler would give)."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp")):
        data = _image(fmt, rng.randrange(2**31))
        files[f"intact-{fmt}.{ext}"] = data
        cuts = {"empty": 0, "one": 1, "in_header": HEADER_BYTES // 2, "header_end": HEADER_BYTES,
                "past_header": HEADER_BYTES + 1, "half": len(data) // 2, "all_but_one": len(data) - 1}
        for name, cut in cuts.items():
            files[f"truncated-{name}-{fmt}.{ext}"] = data[:cut]
        for i in range(flips):
            flipped = bytearray(data)
            at = rng.randrange(min(HEADER_BYTES, len(data)))
            flipped[at] ^= 1 << rng.randrange(8)
            files[f"flipped-{i}-{fmt}.{ext}"] = bytes(flipped)
        files[f"wrong_ext-{fmt}.{'png' if ext != 'png' else 'jpg'}"] = data
    files["oversized.png"] = oversized_png()
    files["text_as.jpg"] = b"this is not an image\n" * 4
    files["html_as.png"] = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
    return files


def decodes(data: bytes) -> bool:
    """Whether the decoder reads these bytes as an image (what ingest must mark ``ok``)."""
    try:
        decode_rgb(data, min_side=16)
    except DecodeError:
        return False
    return True
