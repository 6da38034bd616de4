"""XLA_FLAGS for the subprocesses the tests start: the suite's own flags (tests/conftest.py) kept, a
`--xla_force_host_platform_device_count` replaced by the device count the subprocess needs."""

import os

DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None) -> str:
    """This process's XLA_FLAGS without any host device count, plus `devices` host devices if given."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT)]
    return " ".join(kept + ([f"{DEVICE_COUNT}={devices}"] if devices else []))
