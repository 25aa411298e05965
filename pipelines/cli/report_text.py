"""Plain-text summaries of a catalog for ``curate inspect`` and the demo job."""

from __future__ import annotations

from catalog.manifest import list_manifests
from catalog.paths import join
from catalog.tables import describe, list_tables


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


def ablations_text(root: str) -> list[str]:
    """One line per finished ``curate ablate`` of the catalog."""
    from pipelines.ablate.table import finished_ablations

    lines = []
    for summary in finished_ablations(root):
        seeds = len(summary["seeds"])
        lines.append(f"  ablation {summary['name']}: {len(summary['arms'])} arms x {seeds} "
                     f"seed{'s' if seeds > 1 else ''}, {summary['steps']} steps ({', '.join(summary['arms'])}): "
                     f"{join(root, 'ablations', summary['name'], 'results.md')}")
    return ["", "ablations:", *lines] if lines else []
