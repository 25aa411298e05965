"""Plain-text summaries of a catalog for ``curate inspect`` and the demo job."""

from __future__ import annotations

import posixpath

from catalog.manifest import list_manifests
from catalog.paths import join
from catalog.sql import query
from catalog.tables import describe, list_tables

EXAMPLES_PER_REASON = 2


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect_text(root: str, last_runs: int = 8) -> str:
    lines = [f"catalog {root}", "", f"{'table':<22}{'rows':>12}{'shards':>8}{'bytes':>12}  metadata"]
    tables = list_tables(root)
    if not tables:
        lines.append("  (no tables yet)")
    for name in tables:
        info = describe(root, name)
        meta = {k: v for k, v in info.metadata.items() if k not in ("table", "schema_version")}
        extra = ", ".join(f"{k}={v}" for k, v in meta.items())
        lines.append(f"{name:<22}{info.rows:>12,}{info.shards:>8}{_size(info.bytes):>12}  {extra}")
    runs = list_manifests(root)[-last_runs:]
    lines += ["", f"last {len(runs)} runs:" if runs else "no runs recorded (no manifest: not finished)"]
    for m in runs:
        rows = ", ".join(f"{k}={v}" for k, v in m.get("rows", {}).items())
        lines.append(f"  {m['started'][:19]}  {m['stage']:<10} {m['status']:<8} {m['wall_seconds']:>8.1f}s  "
                     f"{m['peak_memory_mb']:>7.0f} MiB  {rows}")
    lines += ablations_text(root)
    return "\n".join(lines)


def skipped_text(by_extension: dict[str, int]) -> str:
    """``skipped 5 (.svg ×3, .txt ×2)``: the files ingest could not use, by extension."""
    if not by_extension:
        return "skipped 0"
    shown = ", ".join(f"{ext} ×{n}" for ext, n in list(by_extension.items())[:6])
    more = ", …" if len(by_extension) > 6 else ""
    total = sum(by_extension.values())
    return f"skipped {total} ({shown}{more}); reasons: curate sql \"SELECT reason, uri FROM errors\""


def _name(uri: str | None) -> str:
    return posixpath.basename(uri.split("#", 1)[0]) if uri else "(not in the pool)"


def dedup_text(root: str) -> str:
    """Images dedup removed per reason, with a few example pairs (removed → kept) by file name."""
    rows = query(root, "SELECT reason, count(*) AS n FROM duplicates GROUP BY 1 ORDER BY 2 DESC, 1").to_pylist()
    if not rows:
        return "dedup: removed 0 images"
    n = sum(r["n"] for r in rows)
    lines = [f"dedup: removed {n} image{'s' if n != 1 else ''}"]
    for r in rows:
        examples = query(root, "SELECT uri, kept_uri, similarity FROM duplicate_pairs WHERE reason = ? "
                               "ORDER BY similarity DESC, uri LIMIT ?", [r["reason"], EXAMPLES_PER_REASON]).to_pylist()
        shown = "; ".join(f"{_name(e['uri'])} (copy of {_name(e['kept_uri'])}, similarity {e['similarity']:.2f})"
                          for e in examples)
        lines.append(f"  {r['reason']}: {r['n']}, e.g. {shown}")
    return "\n".join(lines)


def ablations_text(root: str) -> list[str]:
    """One line per finished ``curate ablate`` of the catalog."""
    from pipelines.ablate.table import finished_ablations

    lines = []
    for summary in finished_ablations(root):
        seeds, arms = len(summary["seeds"]), len(summary["arms"]) - int(summary.get("untrained", False))
        lines.append(f"  ablation {summary['name']}: {arms} arms x {seeds} "
                     f"seed{'s' if seeds > 1 else ''}, {summary['steps']} steps ({', '.join(summary['arms'])}): "
                     f"{join(root, 'ablations', summary['name'], 'results.md')}")
    return ["", "ablations:", *lines] if lines else []
