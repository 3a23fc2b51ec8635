"""Progress bars for the long steps (sampling, class images, evaluation, export).

A bar shows done / total, the rate and the ETA on stderr when stderr is a terminal; it is
silent in logs and pipes (tqdm's ``disable=None``) and when the caller asks for quiet.
"""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm bar of ``total`` steps; ``enabled=False`` (``--quiet``) silences it."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=None if enabled else True,  # None: silent when not a terminal
        dynamic_ncols=True,
        leave=False,
    )
