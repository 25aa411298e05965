"""A pixel descriptor for copy detection, for pools without a dedicated copy-detection model.

DINOv2 found copies with SSCD embeddings; no such model ships here, so the default descriptor is the
image itself at 16×16: area-averaged (robust to re-encoding and resizing), with each colour
channel's mean removed (robust to global brightness shifts), L2-normalised so cosine similarity
compares structure. Slight crops move it by under one cell. It costs 1.5 KiB per image in float16;
at billions of images use a copy-detection model's embeddings instead (``dedup.descriptor``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIDE = 16
DIM = SIDE * SIDE * 3


def copy_descriptor(img: Image.Image) -> np.ndarray:
    """float16 [3072], unit norm (all zeros for a perfectly flat image)."""
    small = img.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BOX)
    a = np.asarray(small, np.float32).reshape(-1, 3)
    a -= a.mean(axis=0)
    v = a.ravel()
    norm = float(np.linalg.norm(v))
    return (v / norm if norm > 0 else v).astype(np.float16)
