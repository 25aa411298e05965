"""The result of an ablation a person can read: arms x evaluations, mean ± std over seeds.

Written under ``<catalog>/ablations/<name>/`` as ``results.json`` (every value of every seed),
``results.md`` (the table) and ``results.png`` (one bar chart per evaluation, error bars one std).

Beside it, every arm against a baseline arm (``raw`` when there is one), *paired by seed*: a seed's arms
start from the same teacher and are scored on the same images, so what those share (the start, the
hard images of the evaluation set) cancels in the per-seed difference. Its spread, not the two arms'
spreads side by side, says whether one arm beats another.
"""

from __future__ import annotations

import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from catalog.paths import exists, join, ls, read_bytes, write_bytes_atomic

RESULTS = ("results.json", "results.md", "results.png")
LABELS = {"knn": "k-NN", "knn_head": "k-NN head", "knn_tail": "k-NN tail", "linear_probe": "linear",
          "instance_recall_at_1": "inst. R@1", "instance_map": "inst. mAP", "dense_miou": "dense mIoU"}


def _stats(values: list[float]) -> dict:
    """Mean and sample standard deviation (None with one seed)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "values": values}


def _trained(arms: list[str], mechanics: dict) -> list[str]:
    """The arms that saw images (not the untrained reference row)."""
    return [a for a in arms if any(mechanics[a]["images_seen"])]


def baseline_arm(arms: list[str], mechanics: dict, reference: str = "raw") -> str:
    """The arm the others are compared with: ``reference`` when it is a trained arm, else the first one."""
    trained = _trained(arms, mechanics)
    return reference if reference in trained else (trained or arms)[0]


def paired(table: dict, mechanics: dict, arms: list[str], metrics: list[str], baseline: str) -> dict:
    """Per trained arm but the baseline, and metric: the per-seed differences arm − baseline, mean and std."""
    seeds = mechanics[baseline]["seeds"]
    out = {}
    for arm in _trained(arms, mechanics):
        if arm == baseline:
            continue
        if mechanics[arm]["seeds"] != seeds:
            raise ValueError(f"arm {arm!r} ran seeds {mechanics[arm]['seeds']}, {baseline!r} ran {seeds}: "
                             "a paired comparison needs the same seeds")
        out[arm] = {m: _stats([a - b for a, b in zip(table[arm][m]["values"], table[baseline][m]["values"])])
                    for m in metrics}
    return out


def summarise(name: str, scores: list[dict], arms: list[str], metrics: list[str], reference: str = "raw") -> dict:
    """The table from every run's ``scores.json``: per arm and metric the seeds' values, mean and std;
    and each arm against the baseline (`baseline_arm` of ``reference``), paired by seed."""
    table, mechanics = {}, {}
    for arm in arms:
        runs = sorted((s for s in scores if s["arm"] == arm), key=lambda s: s["seed"])
        if not runs:
            raise ValueError(f"arm {arm!r} has no finished run")
        table[arm] = {m: _stats([r["scores"][m] for r in runs]) for m in metrics}
        steps = [r["steps"] for r in runs]
        homogeneous = [r["homogeneous_steps"] for r in runs]
        mechanics[arm] = {
            "seeds": [r["seed"] for r in runs], "steps": steps, "images_seen": [r["images_seen"] for r in runs],
            "p_homogeneous": runs[0]["plan"]["p_homogeneous"],
            "homogeneous_share": None if homogeneous[0] is None else sum(homogeneous) / sum(steps),
            "homogeneous_steps": homogeneous, "parts": runs[0]["plan"]["parts"],
            "train_seconds": [r["train_seconds"] for r in runs],
        }
    baseline = baseline_arm(arms, mechanics, reference)
    return {"name": name, "arms": arms, "metrics": metrics, "table": table, "mechanics": mechanics,
            "baseline": baseline, "paired": paired(table, mechanics, arms, metrics, baseline)}


def _cell(stats: dict, best: bool) -> str:
    mean = f"{100 * stats['mean']:.1f}"
    text = mean if stats["std"] is None else f"{mean} ± {100 * stats['std']:.1f}"
    return f"**{text}**" if best else text


def markdown(summary: dict) -> str:
    """The table in Markdown: scores in percent, the best mean of each column in bold."""
    metrics, arms, table = summary["metrics"], summary["arms"], summary["table"]
    best = {m: max(table[a][m]["mean"] for a in arms) for m in metrics}
    head = ["arm", *(LABELS.get(m, m) for m in metrics), "images seen", "homogeneous steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        mech = summary["mechanics"][arm]
        share = "—" if mech["homogeneous_share"] is None else \
            f"{100 * mech['homogeneous_share']:.1f} % (p = {mech['p_homogeneous']:g})"
        seen = ", ".join(sorted({f"{n:,}" for n in mech["images_seen"]}))
        cells = [_cell(table[arm][m], len(arms) > 1 and table[arm][m]["mean"] == best[m]) for m in metrics]
        lines.append("| " + " | ".join([arm, *cells, seen, share]) + " |")
    n = len(summary["mechanics"][arms[0]]["seeds"])
    lines.append(f"\nScores in %, mean ± std over {n} seed{'s' if n > 1 else ''}; homogeneous steps: the "
                 "loader's flag on every trained step, over all seeds.")
    sizes = summary.get("part_sizes", {})
    parts = "; ".join(f"{arm}: " + (" + ".join(f"{p} ({sizes[p]:,})" if p in sizes else p
                                               for p in summary["mechanics"][arm]["parts"])
                                    or "none (the teacher every arm starts from, before step 0)") for arm in arms)
    lines.append(f"Parts (images): {parts}.")
    return "\n".join(lines) + "\n" + _paired_markdown(summary)


def _paired_markdown(summary: dict) -> str:
    """Each arm minus the baseline, seed by seed, in points; bold where the mean is beyond one std."""
    metrics, baseline, diffs = summary["metrics"], summary["baseline"], summary["paired"]
    if not diffs or len(summary["mechanics"][baseline]["seeds"]) < 2:
        return ""
    head = [f"arm − {baseline}", *(LABELS.get(m, m) for m in metrics)]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, row in diffs.items():
        cells = []
        for m in metrics:
            mean, std = 100 * row[m]["mean"], 100 * row[m]["std"]
            text = f"{mean:+.1f} ± {std:.1f}"
            cells.append(f"**{text}**" if abs(mean) > std else text)
        lines.append("| " + " | ".join([arm, *cells]) + " |")
    lines.append(f"\nPaired by seed: mean ± std over seeds of (arm − {baseline}), in points; the seeds' arms start "
                 "from the same teacher and are scored on the same images. Bold: the mean is beyond one std.")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict) -> bytes:
    """One panel per evaluation: a bar per arm at its mean, error bars one standard deviation."""
    metrics, arms, table = summary["metrics"], summary["arms"], summary["table"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), squeeze=False)
    colours = plt.get_cmap("tab10")(np.arange(len(arms)) % 10)
    for ax, metric in zip(axes[0], metrics):
        means = [100 * table[a][metric]["mean"] for a in arms]
        stds = [100 * (table[a][metric]["std"] or 0.0) for a in arms]
        ax.bar(range(len(arms)), means, yerr=stds, capsize=3, color=colours)
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right")
        ax.set_title(LABELS.get(metric, metric))
        lo = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, lo - 0.15 * (max(means) - lo + 1)), None)
    axes[0][0].set_ylabel("%")
    fig.suptitle(f"ablation {summary['name']}: mean ± std over seeds")
    buf = io.BytesIO()
    fig.savefig(buf, format="PNG", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_results(folder: str, summary: dict) -> list[str]:
    """Write the JSON, Markdown and PNG; returns their URLs."""
    urls = [join(folder, f) for f in RESULTS]
    contents = (json.dumps(summary, indent=2).encode(), markdown(summary).encode(), bar_chart(summary))
    for url, data in zip(urls, contents):
        write_bytes_atomic(url, data)
    return urls


def finished_ablations(root: str) -> list[dict]:
    """Every ablation of the catalog with results, by name."""
    found = [join(folder, RESULTS[0]) for folder in ls(join(root, "ablations"))]
    return [json.loads(read_bytes(url)) for url in found if exists(url)]
