"""Stopping a run cleanly: Ctrl-C or SIGTERM become a flag the training loop checks between
steps, and one collective per step makes every process stop at the same step."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

__all__ = ["StopSignals", "step_status"]


class StopSignals:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a flag checked between steps (save,
    then exit cleanly). SIGTERM is what SLURM, Kubernetes and ``timeout`` send before a kill.

    A second signal stops at once, except under a launcher (torchrun forwards the signal it
    got to every worker, so one Ctrl-C may arrive twice): there the flag is all that counts.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.terminated = False  # the first signal was SIGTERM
        self._previous: dict[int, Any] = {}
        self._launched = "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if self._launched:
                return
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True
        self.terminated = signum == signal.SIGTERM

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def step_status(loss: torch.Tensor, interrupt: StopSignals, accelerator: Any) -> dict[str, bool]:
    """One collective per step: did any process see a non-finite loss, a Ctrl-C or a SIGTERM?
    Every process then stops at the same step."""
    flags = torch.tensor(
        [
            float(not torch.isfinite(loss.detach()).item()),
            float(interrupt.requested),
            float(interrupt.terminated),
        ],
        device=accelerator.device,
    )
    flags = accelerator.reduce(flags, reduction="sum") if accelerator.num_processes > 1 else flags
    return {
        "nonfinite": bool(flags[0] > 0),
        "interrupted": bool(flags[1] > 0),
        "terminated": bool(flags[2] > 0),
    }
