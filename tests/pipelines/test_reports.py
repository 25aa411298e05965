"""Contact sheets are previews: an image that cannot be read leaves a gap, never a crashed stage."""

import io

import numpy as np
from PIL import Image

from pipelines.reports import THUMB, contact_sheet


def test_a_sheet_skips_unreadable_uris_and_draws_the_rest(tmp_path):
    photo = tmp_path / "red.png"
    Image.new("RGB", (80, 60), (255, 0, 0)).save(photo)
    uris = {7: ["nosuchproto://bucket/a.jpg", str(tmp_path / "gone.png"), "", str(photo)]}
    sheet = np.asarray(Image.open(io.BytesIO(contact_sheet(uris, "t", per_row=4))).convert("RGB"))
    red = (sheet[..., 0] > 200) & (sheet[..., 1] < 50)
    assert red.sum() > THUMB  # the readable image is drawn; the three others left gaps
