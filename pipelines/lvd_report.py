"""The build-lvd report: cluster-size histograms and contact sheets a person can look at.

Written as PNGs under ``<catalog>/reports/lvd/``: per level, the distribution of cluster sizes in
the pool and in the curated part (balanced sampling should flatten it), and thumbnail grids of a few
random top-level clusters as they are in the pool and as they are after curation.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from catalog.images import read_image_bytes  # noqa: E402
from catalog.paths import join, write_bytes_atomic  # noqa: E402
from catalog.sql import query  # noqa: E402
from curation.decode import DecodeError, decode_rgb  # noqa: E402

THUMB = 64


def _png(fig_or_img) -> bytes:
    buf = io.BytesIO()
    if isinstance(fig_or_img, Image.Image):
        fig_or_img.save(buf, format="PNG")
    else:
        fig_or_img.savefig(buf, format="PNG", dpi=110, bbox_inches="tight")
        plt.close(fig_or_img)
    return buf.getvalue()


def size_histograms(root: str, part: str, n_levels: int) -> bytes:
    """One panel per level: how many images each cluster holds, pool vs curated (log scale)."""
    fig, axes = plt.subplots(1, n_levels, figsize=(3.2 * n_levels, 3), squeeze=False)
    for i, ax in enumerate(axes[0]):
        col = f"l{i + 1}"
        for table, label in (("clusters", "pool"), (f"curated_{part}", "curated")):
            sizes = query(root, f"SELECT count(*) AS n FROM {table} GROUP BY {col}").column(0).to_numpy()
            sorted_sizes = np.sort(sizes)[::-1]
            ax.plot(np.arange(1, len(sorted_sizes) + 1), sorted_sizes, label=f"{label} ({len(sizes)} clusters)")
        ax.set_yscale("log")
        ax.set_title(f"level {i + 1}: cluster sizes")
        ax.set_xlabel("cluster rank")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("images")
    return _png(fig)


def contact_sheet(uris_by_cluster: dict[int, list[str]], title: str, per_row: int = 10) -> bytes:
    """A grid: one row of thumbnails per cluster, labelled with the cluster id."""
    rows = max(1, len(uris_by_cluster))
    sheet = Image.new("RGB", (80 + per_row * (THUMB + 2), 20 + rows * (THUMB + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=(0, 0, 0))
    for r, (cluster_id, uris) in enumerate(sorted(uris_by_cluster.items())):
        y = 20 + r * (THUMB + 2)
        draw.text((4, y + THUMB // 2 - 6), f"c{cluster_id}", fill=(0, 0, 0))
        for c, uri in enumerate(uris[:per_row]):
            try:
                img = decode_rgb(read_image_bytes(uri), min_side=THUMB)
            except (DecodeError, OSError):
                continue
            img.thumbnail((THUMB, THUMB))
            sheet.paste(img, (80 + c * (THUMB + 2), y))
    return _png(sheet)


def _uris_of_clusters(root: str, table: str, top_col: str, clusters: list[int], per_row: int) -> dict[int, list[str]]:
    ids = ", ".join(str(c) for c in clusters)
    source = "pool" if table == "clusters" else table
    uri_expr = "p.uri" if table == "clusters" else "t.uri"
    rows = query(root, f"SELECT t.{top_col} AS c, {uri_expr} AS uri FROM {table} t "
                       f"JOIN pool p USING (image_id) WHERE t.{top_col} IN ({ids}) ORDER BY hash(t.image_id)")
    out: dict[int, list[str]] = {c: [] for c in clusters}
    for c, uri in zip(rows.column("c").to_pylist(), rows.column("uri").to_pylist()):
        if len(out[c]) < per_row:
            out[c].append(uri)
    del source
    return out


def write_report(root: str, part: str, n_levels: int, seed: int = 0, n_clusters: int = 6) -> list[str]:
    """Write the histograms and contact sheets; returns their URLs."""
    out_dir = join(root, "reports", part)
    written = []
    url = join(out_dir, "cluster_sizes.png")
    write_bytes_atomic(url, size_histograms(root, part, n_levels))
    written.append(url)
    top_col = f"l{n_levels}"
    top = query(root, f"SELECT DISTINCT {top_col} FROM clusters ORDER BY 1").column(0).to_numpy()
    chosen = sorted(np.random.default_rng(seed).choice(top, size=min(n_clusters, len(top)), replace=False).tolist())
    for table, label in (("clusters", "pool"), (f"curated_{part}", "curated")):
        sheet = contact_sheet(_uris_of_clusters(root, table, top_col, chosen, 10),
                              f"{label}: random top-level clusters (level {n_levels})")
        url = join(out_dir, f"contact_sheet_{label}.png")
        write_bytes_atomic(url, sheet)
        written.append(url)
    return written
