"""Synthetic long-tailed embedding pools with known concepts, for curation tests and benchmarks."""

from __future__ import annotations

import numpy as np


def concept_embeddings(
    n: int = 200_000,
    d: int = 384,
    n_concepts: int = 1000,
    n_super: int = 50,
    zipf_a: float = 1.0,
    *,
    super_weight: float = 0.6,
    noise: float = 0.045,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x [n, d] float32 unit rows, concept [n] int64, super_concept [n] int64).

    Mimics web-scale embeddings: concept means sit around super-concept means (cosine ≈
    ``super_weight``² between siblings, ≈ 0 across super-concepts), concept sizes follow Zipf(a)
    (a = 1 over 1000 concepts gives normalised concept entropy ≈ 0.75, like a skewed web pool), and
    each concept has its own anisotropic, log-normal per-dimension noise scale. Every concept gets at
    least one row.
    """
    rng = np.random.default_rng(seed)
    p = np.arange(1, n_concepts + 1, dtype=np.float64) ** -zipf_a
    p = rng.permutation(p / p.sum())
    counts = 1 + rng.multinomial(n - n_concepts, p)
    concept = np.repeat(np.arange(n_concepts), counts)
    rng.shuffle(concept)
    super_of = rng.integers(n_super, size=n_concepts)
    super_means = _unit(rng.standard_normal((n_super, d)))
    own = _unit(rng.standard_normal((n_concepts, d)))
    means = _unit(super_weight * super_means[super_of] + np.sqrt(1 - super_weight**2) * own)
    scales = noise * np.exp(0.5 * rng.standard_normal((n_concepts, d)))
    x = np.empty((n, d), dtype=np.float32)
    step = 1 << 16
    for s in range(0, n, step):
        c = concept[s : s + step]
        z = rng.standard_normal((len(c), d)).astype(np.float32)
        x[s : s + step] = _unit(means[c] + z * scales[c])
    return x, concept, super_of[concept]


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def normalised_entropy(labels: np.ndarray, n_classes: int) -> float:
    """H(labels) / ln(n_classes): 1 for a uniform spread over all classes."""
    p = np.bincount(labels, minlength=n_classes) / max(len(labels), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(n_classes))
