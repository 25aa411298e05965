"""The one progress reporter: a tqdm bar with a rate, quiet when asked."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True) -> tqdm:
    """A progress bar showing count, rate and ETA on stderr.

    Set ``CURATE_PROGRESS=0`` to silence bars (tests, logs of cluster jobs).
    """
    disable = not enabled or os.environ.get("CURATE_PROGRESS", "1") == "0"
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=disable,
        mininterval=0.5,
        dynamic_ncols=True,
        smoothing=0.1,
    )
