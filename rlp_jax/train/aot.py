"""A compiled train step saved to a file and loaded by the trainer: the start on a pod skips compiling.

`python -m rlp_jax.plan ... --compile --save-executable FILE` AOT-compiles the run's step for the target (compile-only
devices, no chip needed) and writes it here with `jax.experimental.serialize_executable`; `python -m rlp_jax.train
... --executable FILE` loads it instead of compiling, as MaxText's `train_compile.py` / `compiled_trainstep_file`
do. A file holds the executable and a fingerprint of what it was compiled for: the jax and jaxlib versions, the
platform and device count, the mesh, the model config the step was built with, and every setting the step's
program depends on. A file that does not match the run is refused in one line, never run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path

import jax
import jaxlib

from rlp_jax.runs.config import ConfigError, RunConfig, to_dict

FORMAT = "rlp_jax-executable-1"


def fingerprint(cfg: RunConfig, mcfg, ids, *, platform: str, devices: int, mesh: dict[str, int]) -> dict:
    """What a compiled step depends on: versions, platform, device count, mesh, the model config (as built,
    embeddings grown for added tokens), the tokenizer's ids (`rlp.think_ids`: compiled in as constants) and the
    settings of the step (rlp, optim, the batch's shape, the objective, steps: the learning-rate schedule is
    compiled in, micro-batches). mcfg: the model config; ids: `rlp.think_ids.ThinkIds`."""
    run, model_fields, ids = to_dict(cfg), dataclasses.asdict(mcfg), dataclasses.asdict(ids)
    digest = lambda x: hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()[:12]  # noqa: E731
    settings = {"rlp": run["rlp"], "optim": run["optim"], "batch": [cfg.data.batch_size, cfg.data.seq_len],
                "train": {k: run["train"][k] for k in ("objective", "steps", "micro_batches")}}
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "platform": platform, "devices": int(devices),
            "mesh": dict(mesh), "model": digest(model_fields), "vocab": model_fields.get("vocab_size"),
            "marker ids": [ids["start"], ids["end"]], "banned ids": digest(list(ids["banned"])),
            "prompt": digest(list(ids["prompt"])), "word-start ids": digest(list(ids["word_starts"])),
            "settings (rlp, optim, batch, steps)": digest(settings)}


def save(compiled, path, fp: dict) -> Path:
    """Write `compiled` (a `jax.stages.Compiled` train step) and its fingerprint to `path`."""
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    except Exception as e:   # a backend without executable serialization
        raise ConfigError(f"this compiler cannot serialize the step ({str(e).splitlines()[0]})") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"format": FORMAT, "fingerprint": fp, "payload": payload, "in_tree": in_tree,
                     "out_tree": out_tree}, f)
    tmp.replace(path)
    return path


def load(path, expected: dict):
    """The step saved at `path`, loaded on this process's devices, if its fingerprint is `expected`; a one-line
    ConfigError naming the difference and the fix otherwise."""
    from jax.experimental import serialize_executable

    fix = (f"recompile it for this run (python -m rlp_jax.plan ... --compile --save-executable {path}) or "
           "drop --executable")
    try:
        with open(path, "rb") as f:
            saved = pickle.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--executable {path}: no such file") from None
    except Exception as e:
        raise ConfigError(f"--executable {path} is not a saved train step ({type(e).__name__}): {fix}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ConfigError(f"--executable {path} is not a saved train step: {fix}")
    got = saved["fingerprint"]
    differ = [k for k in expected if got.get(k) != expected[k]]
    if differ:
        what = "; ".join(f"{k} {got.get(k)} (this run: {expected[k]})" for k in differ)
        raise ConfigError(f"--executable {path} was compiled for another run: {what}; {fix}")
    # JAX's persistent compilation cache, when on, breaks a deserialized CPU executable ("Function ... not
    # found" when it runs); this process's other programs (the eval step) compile without it
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return serialize_executable.deserialize_and_load(saved["payload"], saved["in_tree"], saved["out_tree"])
    except Exception as e:   # the runtime refuses it (another chip generation, another libtpu)
        raise ConfigError(f"--executable {path} cannot be loaded here ({str(e).splitlines()[0]}): {fix}") from None
