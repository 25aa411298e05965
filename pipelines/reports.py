"""Reports a person can look at: PNG histograms and contact sheets under ``<catalog>/reports/``.

- build-lvd: per level, cluster sizes in the pool and in the curated part (balanced sampling should
  flatten them); after an update of a grown pool, what the curated part gained and lost per top-level
  cluster beside the share of that cluster's new images that drifted (`update_figure`); thumbnails
  of the largest, a few random and the smallest top-level clusters before and after curation, each
  row labelled with the cluster's size; the pool's quality signals
  (a histogram each, the filter's removals stacked on top) and what each filter rule removed;
- retrieve: a few seed images next to what they retrieved;
- dedup: a few copy groups, the kept image first.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from catalog.decode import DecodeError, decode_rgb  # noqa: E402
from catalog.images import UnreadableItem, read_item  # noqa: E402
from catalog.paths import join, write_bytes_atomic  # noqa: E402
from catalog.schemas import ERRORS_TABLE, FILTER_STAGE  # noqa: E402
from catalog.shards import table_exists  # noqa: E402
from catalog.sql import query  # noqa: E402

THUMB = 64
LABEL_WIDTH = 96


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


def contact_sheet(uris_by_cluster: dict[int | str, list[str]], title: str, per_row: int = 10,
                  labels: dict[int | str, str] | None = None) -> bytes:
    """A grid: one row of thumbnails per cluster (or filter rule), in the dict's order, labelled with
    ``labels`` (lines of text) or the cluster id."""
    rows = max(1, len(uris_by_cluster))
    sheet = Image.new("RGB", (LABEL_WIDTH + per_row * (THUMB + 2), 20 + rows * (THUMB + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=(0, 0, 0))
    for r, (cluster_id, uris) in enumerate(uris_by_cluster.items()):
        y = 20 + r * (THUMB + 2)
        label = (labels or {}).get(cluster_id) or (str(cluster_id) if len(str(cluster_id)) <= 10
                                                   else "…" + str(cluster_id)[-9:])
        draw.multiline_text((4, y + 4), label, fill=(0, 0, 0), spacing=2)
        for c, uri in enumerate(uris[:per_row]):
            try:
                img = decode_rgb(read_item(uri), min_side=THUMB)
            except (UnreadableItem, DecodeError):  # a sheet is a preview: an unreadable image leaves a gap
                continue
            img.thumbnail((THUMB, THUMB))
            sheet.paste(img, (LABEL_WIDTH + c * (THUMB + 2), y))
    return _png(sheet)


def pick_clusters(sizes: dict[int, int], n_each: int, seed: int) -> list[tuple[int, str]]:
    """The ``n_each`` largest clusters, ``n_each`` random others, then the ``n_each`` smallest (smallest
    last), each with its role: a sheet of the same few clusters hides both ends of the distribution."""
    order = sorted(sizes, key=lambda c: (-sizes[c], c))
    largest = order[:n_each]
    smallest = [c for c in order[::-1] if c not in largest][:n_each][::-1]
    middle = [c for c in order if c not in largest and c not in smallest]
    picked = np.random.default_rng(seed).choice(len(middle), size=min(n_each, len(middle)), replace=False)
    randoms = [middle[i] for i in sorted(picked.tolist())]
    return [(c, "largest") for c in largest] + [(c, "random") for c in randoms] + [(c, "smallest") for c in smallest]


def _grouped(rows, per_row: int) -> dict[int, list[str]]:
    """``{group: [uri, …]}`` from a query result with columns ``g`` and ``uri``, in row order."""
    out: dict[int, list[str]] = {}
    for g, uri in zip(rows.column("g").to_pylist(), rows.column("uri").to_pylist()):
        bucket = out.setdefault(g, [])
        if len(bucket) < per_row:
            bucket.append(uri)
    return out


def _uris_of_clusters(root: str, table: str, top_col: str, clusters: list[int], per_row: int) -> dict[int, list[str]]:
    ids = ", ".join(str(c) for c in clusters)
    return _grouped(query(root, f"SELECT t.{top_col} AS g, p.uri AS uri FROM {table} t JOIN pool p USING (image_id) "
                                f"WHERE t.{top_col} IN ({ids}) ORDER BY hash(t.image_id)"), per_row)


# the signals drawn, with their axis label; sharpness spans decades, so its axis is logarithmic
QUALITY_PANELS = (("min_side", "shortest side (px)"), ("aspect", "aspect ratio (long / short)"),
                  ("sharpness", "sharpness (Laplacian variance, log)"), ("dark_fraction", "dark pixel fraction"),
                  ("bright_fraction", "bright pixel fraction"), ("colour_entropy", "colour entropy (bits)"))


def quality_histograms(root: str) -> bytes:
    """One panel per signal over the usable pool; images the filter removed are stacked in another colour."""
    rows = query(root, "SELECT p.*, e.reason IS NOT NULL AS removed FROM pool p LEFT JOIN (SELECT image_id, reason "
                       "FROM errors WHERE stage = ?) e USING (image_id) WHERE p.status = 'ok' AND p.sharpness "
                       "IS NOT NULL", [FILTER_STAGE])
    removed = rows.column("removed").to_numpy(zero_copy_only=False).astype(bool)
    constant = int(rows.column("nearly_constant").to_numpy(zero_copy_only=False).astype(bool).sum())
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, (column, label) in zip(axes.ravel(), QUALITY_PANELS):
        values = rows.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
        if column == "sharpness":
            values = np.log10(np.maximum(values, 1e-3))
        bins = np.histogram_bin_edges(values, bins=40) if len(values) else 10
        ax.hist([values[~removed], values[removed]], bins=bins, stacked=True, label=["kept", "filtered"],
                color=["tab:blue", "tab:red"])
        ax.set_xlabel(label + (" (log10)" if column == "sharpness" else ""))
        ax.set_yscale("log")
    axes[0][0].set_ylabel("images")
    axes[1][0].set_ylabel("images")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"quality signals of {len(removed)} usable pool images ({constant} nearly constant, "
                 f"{int(removed.sum())} filtered)")
    return _png(fig)


def filtered_sheet(root: str, per_row: int = 10) -> bytes | None:
    """One row per filter rule: images it removed (None when the filter removed nothing)."""
    rows = query(root, "SELECT replace(reason, 'filtered:', '') AS g, uri FROM errors WHERE stage = ? "
                       "ORDER BY reason, hash(image_id)", [FILTER_STAGE])
    groups = _grouped(rows, per_row)
    return contact_sheet(groups, "removed by each filter rule (reason filtered:<rule>)") if groups else None


def write_quality_report(root: str, out_dir: str) -> list[str]:
    """The signal histograms and (when the filter removed images) the sheet of what each rule removed."""
    written = [join(out_dir, "quality_signals.png")]
    write_bytes_atomic(written[0], quality_histograms(root))
    sheet = filtered_sheet(root)
    if sheet is not None:
        written.append(join(out_dir, "filtered.png"))
        write_bytes_atomic(written[1], sheet)
    return written


UPDATE_BARS = 30  # top-level clusters drawn in the update figure: those that changed most


def update_figure(diff: dict[str, Any], drift: dict[str, Any] | None) -> bytes:
    """The curated part's change after an update (`pipelines.stages.sample.write_diff`), per top-level
    cluster: images added and removed, and beside them the share of the cluster's new pool images that
    lie beyond the clustered images' 99th-percentile distance (the cluster update's drift): a cluster
    that gained many far images holds something the hierarchy did not see."""
    per_top = {int(t): v for t, v in diff["per_top_cluster"].items()}
    far = {int(t): v for t, v in (drift or {}).get("per_top_cluster", {}).items()}
    changed = sorted(set(per_top) | set(far), key=lambda t: (-(per_top.get(t, {}).get("added", 0)
                                                             + per_top.get(t, {}).get("removed", 0)
                                                             + far.get(t, {}).get("far", 0)), t))[:UPDATE_BARS]
    x = np.arange(len(changed))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.32 * len(changed) + 2), 5.5), sharex=True)
    top.bar(x, [per_top.get(t, {}).get("added", 0) for t in changed], color="tab:green", label="added")
    top.bar(x, [-per_top.get(t, {}).get("removed", 0) for t in changed], color="tab:red", label="removed")
    top.axhline(0, color="black", linewidth=0.6)
    top.set_ylabel("curated images")
    top.legend(fontsize=7)
    top.set_title(f"update: kept {diff['kept']} of the earlier curated images ({diff['kept_share']:.1%}), "
                  f"{diff['added']} added, {diff['removed']} removed", fontsize=9)
    if drift:
        bottom.bar(x, [far.get(t, {}).get("share", 0.0) for t in changed], color="tab:orange")
        bottom.set_title(f"new pool images beyond the 99th-percentile distance: {drift['far']} of {drift['new']} "
                         f"({drift['share']:.1%}) overall, per cluster below", fontsize=9)
    else:
        bottom.set_title("no cluster update in the latest clustering (it ran from scratch)", fontsize=9)
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("share far")
    bottom.set_xticks(x, [str(t) for t in changed], rotation=90, fontsize=7)
    bottom.set_xlabel("top-level cluster (most changed first)")
    return _png(fig)


def write_lvd_report(root: str, part: str, n_levels: int, seed: int = 0, n_each: int = 2,
                     with_images: bool = True, diff: dict[str, Any] | None = None,
                     drift: dict[str, Any] | None = None) -> list[str]:
    """Write the histograms, the update figure (``diff``: the part was sampled again after the pool grew)
    and (``with_images``: the pool's images are known) contact sheets of the largest, a few random and
    the smallest top-level clusters, labelled with their sizes; returns their URLs."""
    out_dir = join(root, "reports", part)
    written = []
    url = join(out_dir, "cluster_sizes.png")
    write_bytes_atomic(url, size_histograms(root, part, n_levels))
    written.append(url)
    if diff is not None:
        written.append(join(out_dir, "update.png"))
        write_bytes_atomic(written[-1], update_figure(diff, drift))
    if not with_images:
        return written
    measured = "sharpness" in query(root, "SELECT * FROM pool LIMIT 0").column_names  # not in older pools
    if measured and table_exists(root, ERRORS_TABLE):
        written += write_quality_report(root, out_dir)
    top_col = f"l{n_levels}"
    pool_sizes = _sizes(root, "clusters", top_col)
    chosen = pick_clusters(pool_sizes, n_each, seed)
    curated_sizes = _sizes(root, f"curated_{part}", top_col)
    for table, label in (("clusters", "pool"), (f"curated_{part}", "curated")):
        uris = _uris_of_clusters(root, table, top_col, [c for c, _ in chosen], 10)
        labels = {c: f"{role}\n#{c}\nn={pool_sizes[c]}" if label == "pool" else
                  f"{role}\n#{c}\n{curated_sizes.get(c, 0)} of {pool_sizes[c]}" for c, role in chosen}
        sheet = contact_sheet({c: uris.get(c, []) for c, _ in chosen},
                              f"{label}: largest, random and smallest top-level clusters (level {n_levels}), "
                              "with their sizes", labels=labels)
        url = join(out_dir, f"contact_sheet_{label}.png")
        write_bytes_atomic(url, sheet)
        written.append(url)
    return written


def _sizes(root: str, table: str, column: str) -> dict[int, int]:
    rows = query(root, f"SELECT {column} AS c, count(*) AS n FROM {table} GROUP BY 1")
    return dict(zip(rows.column("c").to_pylist(), rows.column("n").to_pylist()))


def write_retrieval_report(root: str, seed: str, seed_uris: dict[int, str], level: int = 1, n_seeds: int = 6) -> str:
    """Rows of [seed image, then the pool images it retrieved, best first] (kNN mode), or of images
    retrieved from the same pool cluster (cluster mode)."""
    rows = query(root, "SELECT r.seed_image_id AS g, p.uri AS uri FROM retrieved r JOIN pool p USING (image_id) "
                       "WHERE r.seed = ? AND r.seed_image_id <> -1 ORDER BY r.seed_image_id, r.rank", [seed])
    groups = _grouped(rows, 9)
    if groups:
        chosen = sorted(groups)[:n_seeds]
        sheet = {g: [seed_uris[g], *groups[g]] for g in chosen if g in seed_uris}
        title = f"seed {seed}: seed image (first column), then its nearest pool images"
    else:
        sheet = _grouped(query(root, f"SELECT c.l{level} AS g, p.uri AS uri FROM retrieved r "
                                     "JOIN pool p USING (image_id) JOIN clusters c USING (image_id) "
                                     f"WHERE r.seed = '{seed}' ORDER BY g, r.rank"), 10)
        sheet = dict(list(sheet.items())[:n_seeds])
        title = f"seed {seed}: images retrieved from pool clusters that hold seed images (one row per cluster)"
    url = join(root, "reports", "retrieve", f"{seed}.png")
    write_bytes_atomic(url, contact_sheet(sheet, title))
    return url


def write_dedup_report(root: str, n_groups: int = 8) -> str:
    """Copy groups: the kept image, then the images removed in its favour."""
    rows = query(root, "SELECT d.kept_id AS g, p.uri AS uri, 0 AS o FROM (SELECT DISTINCT kept_id FROM duplicates "
                       "WHERE reason = 'copy' ORDER BY kept_id LIMIT " + str(n_groups) + ") d "
                       "JOIN pool p ON p.image_id = d.kept_id UNION ALL "
                       "SELECT d.kept_id AS g, p.uri AS uri, 1 AS o FROM duplicates d JOIN pool p USING (image_id) "
                       "WHERE d.reason = 'copy' ORDER BY g, o")
    groups = _grouped(rows, 10)
    sheet = dict(list(sorted(groups.items()))[:n_groups])
    url = join(root, "reports", "dedup", "copy_groups.png")
    write_bytes_atomic(url, contact_sheet(sheet, "copy groups: kept image first, then the removed copies"))
    return url
