"""Drift of new rows against a clustering: how many lie farther from their nearest centroid than nearly
all the rows the clustering was fitted on. Images of a concept the clustering never saw land far from
every centroid, so a high share (overall, or in one top cluster) says the hierarchy no longer covers the
pool. Out-of-sample rows lie somewhat farther than fitted ones anyway, the more so in small clusters, so
the share of same-distribution rows is above 1 %."""

from __future__ import annotations

from typing import Any

import numpy as np


def drift_report(clustered: np.ndarray, top: np.ndarray, distances: np.ndarray,
                 percentile: float = 99.0) -> dict[str, Any]:
    """The share of new rows (their top-level cluster ``top`` and distance to their level-1 centroid)
    farther than the ``percentile`` of the ``clustered`` rows' distances, overall and per top cluster."""
    limit = far_limit(clustered, percentile)
    far = distances > limit
    per_top = {int(t): {"new": int((top == t).sum()), "far": int(far[top == t].sum()),
                        "share": round(float(far[top == t].mean()), 4)} for t in np.unique(top)}
    return {"new": len(distances), "far": int(far.sum()), "share": float(far.mean()) if len(far) else 0.0,
            "p99_distance": limit, "per_top_cluster": per_top}


def far_limit(clustered: np.ndarray, percentile: float = 99.0) -> float:
    """The distance beyond which a row counts as far: the ``percentile`` of the fitted rows' distances."""
    return float(np.percentile(clustered, percentile)) if len(clustered) else float("inf")
