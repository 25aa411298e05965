"""One catalog part as a map-style source of decoded images.

A bad image (undecodable bytes, or bytes gone from storage) is never fatal: ``try_load`` returns
``None`` and counts it by reason, and the loader substitutes the next image of the same part's stream.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
from PIL import Image

from catalog.decode import MISSING, DecodeError, decode_rgb
from catalog.images import read_image_bytes


class PartDataset:
    """Images of one part, addressed by row index of an Arrow table with ``image_id`` and ``uri``."""

    def __init__(
        self, name: str, table: pa.Table, *, max_pixels: int | None = None, min_side: int | None = None
    ) -> None:
        missing = {"image_id", "uri"} - set(table.column_names)
        if missing:
            raise ValueError(f"part {name!r} table lacks columns {sorted(missing)}")
        if table.num_rows == 0:
            raise ValueError(f"part {name!r} is empty")
        self.name = name
        self.image_ids = table.column("image_id").to_numpy()
        self.uris = table.column("uri").combine_chunks()
        self._decode_options: dict[str, int] = {"min_side": min_side} if min_side is not None else {}
        if max_pixels is not None:
            self._decode_options["max_pixels"] = max_pixels
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_id(self, index: int) -> int:
        return int(self.image_ids[index])

    def load(self, index: int) -> Image.Image:
        """The decoded RGB image at ``index``; raises ``DecodeError`` if unusable."""
        uri = self.uris[index].as_py()
        try:
            data = read_image_bytes(uri)
        except FileNotFoundError as e:
            raise DecodeError(MISSING, uri) from e
        return decode_rgb(data, **self._decode_options)

    def try_load(self, index: int) -> Image.Image | None:
        """Like ``load`` but a bad image returns ``None`` and is counted in ``skipped[reason]``."""
        try:
            return self.load(index)
        except DecodeError as e:
            self.skipped[e.reason] += 1
            return None
