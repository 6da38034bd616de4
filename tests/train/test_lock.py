"""One training per run directory: the object-store lease (`rlp_jax.train.lock.Lease`, exercised on a local
path through the same `etils.epath` calls it makes on gs://) and the local lock."""

import json
import time

import pytest

from rlp_jax.runs.config import ConfigError
from rlp_jax.train.lock import Lease, held_lease, hold_workdir, local_lock


def test_a_live_lease_refuses_a_second_job_and_names_the_holder(tmp_path):
    url = str(tmp_path / ".lease")
    first, second = Lease(url, settle_s=0), Lease(url, settle_s=0)
    first.acquire()
    with pytest.raises(ConfigError, match=r"is in use by another training \(pid \d+ on .*free in \d+ s"):
        second.acquire()
    first.release()
    assert not (tmp_path / ".lease").exists()
    second.acquire()                                     # free once released
    assert json.loads((tmp_path / ".lease").read_text())["token"] == second.token


def test_an_expired_lease_is_taken_over(tmp_path, caplog):
    url = str(tmp_path / ".lease")
    dead = Lease(url, lease_s=0.01, settle_s=0)
    dead.acquire()                                       # its job dies without releasing
    time.sleep(0.05)
    Lease(url, settle_s=0).acquire()
    assert "taking over the expired lease" in caplog.text
    assert dead.renew() is False                         # the old holder learns it lost the lease


def test_a_job_that_loses_a_simultaneous_start_stops(tmp_path):
    url = str(tmp_path / ".lease")
    slow, fast = Lease(url, settle_s=0.3), Lease(url, settle_s=0)

    import threading
    err = []
    t = threading.Thread(target=lambda: err.append(pytest.raises(ConfigError, slow.acquire)))
    t.start()
    time.sleep(0.1)
    fast._write()                                        # the other job writes its lease meanwhile
    t.join()
    assert "started at the same moment" in str(err[0].value)


def test_a_held_lease_is_renewed_and_released(tmp_path):
    url = str(tmp_path / ".lease")
    with held_lease(url, renew_s=0.05, lease_s=0.2, settle_s=0) as lease:
        time.sleep(0.5)                                  # longer than lease_s: alive only if renewed
        seen = json.loads((tmp_path / ".lease").read_text())
        assert seen["token"] == lease.token and seen["expires"] > time.time()
        with pytest.raises(ConfigError, match="in use"):
            Lease(url, settle_s=0).acquire()
    assert not (tmp_path / ".lease").exists()


def test_local_workdirs_take_the_lock_and_no_lease(tmp_path):
    with hold_workdir(tmp_path):
        with pytest.raises(ConfigError, match="is in use by another training"), local_lock(tmp_path):
            pass
    assert not (tmp_path / ".lease").exists()
    with hold_workdir(tmp_path, process_index=1), local_lock(tmp_path):
        pass                                             # only process 0 locks
