"""Stopping a run cleanly when it is asked to: a scheduler's SIGTERM or a Ctrl-C, on one host or many (`Preemption`)."""

from __future__ import annotations

import signal

import jax
import numpy as np
from tqdm import tqdm


class Preemption:
    """Turns SIGTERM (a scheduler's preemption) and a first Ctrl-C (SIGINT) into a stop the loop takes after a
    step: it then saves and exits. A second Ctrl-C interrupts at once.

    With several processes the save is collective, so every host must stop at the same step. SIGTERM is
    then left to JAX's preemption service (`jax.distributed` installs its notifier): any host's notice
    reaches all, and `multihost_utils.reached_preemption_sync_point(step)` turns true at the same step on
    every host, a host-side check through the coordination service, with no device work or all-gather per
    step. A Ctrl-C on a host is fed to that service as a SIGTERM of its own. (Should the service be
    disabled, `jax_enable_preemption_service=False`, the hosts all-gather their flags each step instead.)"""

    def __init__(self):
        self.requested: str | None = None     # "SIGTERM" / "SIGINT" once asked on this host
        self.multi = jax.process_count() > 1
        self.service = self.multi and bool(jax.config.jax_enable_preemption_service)
        signals = (signal.SIGINT,) if self.service else (signal.SIGTERM, signal.SIGINT)
        self._old = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            tqdm.write("Ctrl-C: saving after this step (press again to stop at once, without saving)")
            if self.service:
                signal.raise_signal(signal.SIGTERM)   # to JAX's preemption notifier: every host stops

    def stop_at(self, step: int) -> str | None:
        """The signal to stop for after `step` ("SIGTERM" / "SIGINT"), the same on every host, or None.
        Call it after every step, on every host."""
        if not self.multi:
            return self.requested
        from jax.experimental import multihost_utils
        if self.service:
            return (self.requested or "SIGTERM") if multihost_utils.reached_preemption_sync_point(step) else None
        got = multihost_utils.process_allgather(np.asarray([self.requested == "SIGTERM", self.requested == "SIGINT"]))
        return "SIGTERM" if np.any(got[..., 0]) else "SIGINT" if np.any(got[..., 1]) else None

    def restore(self):
        for s, old in self._old.items():
            signal.signal(s, old)
