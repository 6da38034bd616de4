"""One training per run directory: a lock on a local workdir, a lease on an object-store one.

A second training into a run directory that is in use would interleave its checkpoints and metrics with
the first's. `hold_workdir(local, remote)` refuses it in one line that names the holder:
  * local run directory: an exclusive `flock` on WORKDIR/.lock. The kernel releases it with the process
    (also after kill -9); the file stays, holding the last holder's description.
  * checkpoints in an object store (gs://...): jobs on other machines cannot see a local lock, so the run
    also takes a lease, the JSON object `<workdir URL>/.lease` {holder, pid, host, since, expires}, that a
    background thread renews every `RENEW_S` seconds for `LEASE_S` seconds. A lease held by another job
    and not expired refuses the start; an expired one (its job died without releasing it) is taken over
    with a warning. Object stores have no atomic create-if-absent through `etils.epath`, so two jobs that
    start within the same second can both write a lease: each reads it back after `SETTLE_S` seconds and
    the one whose lease was overwritten stops. Clocks of the machines are assumed within a minute.
Only process 0 of a multi-host job takes either.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from rlp_jax.runs.config import ConfigError

log = logging.getLogger(__name__)

LEASE_S = 300.0    # a lease not renewed for this long is free
RENEW_S = 60.0     # how often the holder renews it
SETTLE_S = 2.0     # wait before reading a fresh lease back (a concurrent writer shows up by then)


def _holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}"


@contextlib.contextmanager
def local_lock(workdir: Path):
    """Hold WORKDIR/.lock (exclusive, non-blocking flock) for the block; ConfigError naming the holder
    when another process has it."""
    path = Path(workdir) / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"{workdir} is in use by another training ({holder}); wait for it to finish, stop it, "
                          "or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(_holder_text())
    f.flush()
    try:
        yield
    finally:
        f.close()   # releases the lock


class Lease:
    """A renewable lease object at `url` (any `etils.epath` path: gs://, s3://, or local for tests).

    `acquire()` takes it or raises ConfigError naming the live holder; `renew()` extends it (False when
    another job has overwritten it); `release()` deletes it if it is still ours."""

    def __init__(self, url: str, *, lease_s: float = LEASE_S, settle_s: float = SETTLE_S):
        from etils import epath

        self.path = epath.Path(url)
        self.lease_s, self.settle_s = lease_s, settle_s
        self.token = uuid.uuid4().hex
        self.holder = _holder_text()

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):   # a half-written or foreign object: treat as free
            return None

    def _write(self) -> None:
        self.path.write_text(json.dumps({"token": self.token, "holder": self.holder,
                                         "expires": time.time() + self.lease_s}))

    def acquire(self) -> None:
        seen = self.read()
        if seen is not None and seen.get("token") != self.token:
            left = float(seen.get("expires", 0)) - time.time()
            if left > 0:
                raise ConfigError(
                    f"{self.path.parent} is in use by another training ({seen.get('holder', 'unknown')}; lease "
                    f"renewed within the last {self.lease_s:.0f} s, free in {left:.0f} s if that job is gone); "
                    f"wait for it, stop it, or use another --workdir (delete {self.path} only if it is dead)")
            log.warning("taking over the expired lease of %s (%s)", self.path.parent, seen.get("holder", "unknown"))
        self._write()
        time.sleep(self.settle_s)
        now = self.read()
        if now is None or now.get("token") != self.token:
            raise ConfigError(f"{self.path.parent}: another training started at the same moment "
                              f"({(now or {}).get('holder', 'unknown')}) and holds it; use another --workdir")

    def renew(self) -> bool:
        now = self.read()
        if now is not None and now.get("token") != self.token:
            return False
        self._write()
        return True

    def release(self) -> None:
        now = self.read()
        if now is not None and now.get("token") == self.token:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def held_lease(url: str, *, renew_s: float = RENEW_S, **lease_kw):
    """Acquire the lease at `url`, renew it from a daemon thread while the block runs, release it after."""
    lease = Lease(url, **lease_kw)
    lease.acquire()
    stop = threading.Event()

    def renew():
        while not stop.wait(renew_s):
            try:
                if not lease.renew():
                    log.error("the lease %s was taken by another job; this training's checkpoints may now be "
                              "interleaved with it: stop one of them", lease.path)
                    return
            except Exception as e:   # a transient storage error: try again at the next interval
                log.warning("could not renew the lease %s: %s", lease.path, e)

    thread = threading.Thread(target=renew, name="rlp_jax-lease", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            lease.release()
        except Exception as e:
            log.warning("could not release the lease %s: %s (it expires by itself in %.0f s)", lease.path, e,
                        lease.lease_s)


@contextlib.contextmanager
def hold_workdir(workdir: Path, remote: str | None = None, *, process_index: int = 0):
    """The lock of a run directory (and, when its checkpoints are in an object store, the lease
    `<remote>/.lease` of that URL workdir), on process 0."""
    if process_index != 0:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(local_lock(workdir))
        if remote is not None:
            stack.enter_context(held_lease(remote.rstrip("/") + "/.lease"))
        yield
