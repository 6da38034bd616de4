"""RLP on SmolLM2-135M-Instruct: step-0 probes and pilots (the replication against CPT is not written yet). Resumable.

    python experiments/smollm2_rlp/run.py probe     --workdir runs/smollm2_rlp   # marker init x prompt, step 0
    python experiments/smollm2_rlp/run.py pilot     --workdir runs/smollm2_rlp   # short RLP runs per setting
    python experiments/smollm2_rlp/run.py report    --workdir runs/smollm2_rlp   # tables from what finished

Everything starts from the same model (`experiments/smollm2.py`: the GGUF of SmolLM2-135M-Instruct,
the generated corpus, the prompted setting). Every unit of work writes its result next to its run
directory and is skipped when that result exists, and training runs resume from their checkpoints,
so the driver can be stopped at any point and started again (in another session) with the same
command. The evaluation is fixed here, before any run: held-out documents of the corpus's eval
split (`train.eval_batches` batches; NLL with and without a thought, information gain).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rlp_jax import sharding, train, train_step  # noqa: E402
from rlp_jax.config import RunConfig, load_experiment  # noqa: E402
from rlp_jax.data import make_iterator  # noqa: E402
from rlp_jax.tokenizer import load_tokenizer  # noqa: E402

# Step-0 probe: (name, prompt style, think tokens, new-token init[, thought length]).
PROBES = (
    ("no_prompt/new_mean", "none", ("<think>", "</think>"), "mean"),
    ("no_prompt/new_pieces", "none", ("<think>", "</think>"), "pieces"),
    ("chat/new_mean", "chat", ("<think>", "</think>"), "mean"),
    ("chat/new_pieces", "chat", ("<think>", "</think>"), "pieces"),
    ("chat/reuse_unused_special", "chat", ("<jupyter_text>", "<jupyter_code>"), "mean"),
    ("text/new_pieces", "text", ("<think>", "</think>"), "pieces"),
    ("chat/new_pieces/T16", "chat", ("<think>", "</think>"), "pieces", 16),
    ("chat/new_pieces/T8", "chat", ("<think>", "</think>"), "pieces", 8),
    ("chat/new_pieces/T32", "chat", ("<think>", "</think>"), "pieces", 32),
)
# The first six probes were measured before the eval key became train.run_key(key, "eval", i) (as in
# training's evals); the held-out positions they score differ from the later rows'. Compare within a group.
PROBES_BEFORE_KEY_CHANGE = 6


def base_config(workdir: Path) -> RunConfig:
    module = load_experiment("smollm2")
    return module.prepare(module.config(), workdir)


def variant(cfg: RunConfig, *, style=None, think_tokens=None, init=None, **train_kw) -> RunConfig:
    model = cfg.model
    if think_tokens is not None:
        model = dataclasses.replace(model, think_tokens=think_tokens)
    if init is not None:
        model = dataclasses.replace(model, new_token_init=init)
    rlp = cfg.rlp if style is None else dataclasses.replace(cfg.rlp, prompt=dataclasses.replace(cfg.rlp.prompt, style=style))
    return dataclasses.replace(cfg, model=model, rlp=rlp, train=dataclasses.replace(cfg.train, **train_kw))


def step0_metrics(cfg: RunConfig) -> dict:
    """The held-out eval metrics of the untrained policy under `cfg` (the eval `train.run` logs)."""
    tokenizer = load_tokenizer(cfg.model.init_from, think_tokens=cfg.model.think_tokens)
    cfg = train.with_markers(cfg, tokenizer)
    mcfg, params = train.build_model(cfg, tokenizer, train.run_key(jax.random.key(cfg.train.seed), "build"))
    mesh = sharding.make_mesh(cfg.train.mesh)
    it = make_iterator(cfg.data, tokenizer, split="eval")
    batches = [sharding.global_batch(it.next(), mesh) for _ in range(cfg.train.eval_batches)]
    it.close()
    out = train.evaluate_batches(train_step.make_eval_step(mcfg, cfg.rlp), jax.device_put(params), batches,
                                 cfg.train.seed)
    out["prompt_tokens"] = len(cfg.rlp.prompt.ids)
    return out


PROBE_FILE = HERE / "probe.json"   # committed: a fresh checkout skips the probes already measured


def probe(workdir: Path) -> dict:
    path = PROBE_FILE
    results = json.loads(path.read_text()) if path.exists() else {}
    cfg = base_config(workdir)
    for name, style, markers, init, *length in PROBES:
        if name in results:
            continue
        t0 = time.time()
        v = variant(cfg, style=style, think_tokens=markers, init=init)
        if length:
            v = dataclasses.replace(v, rlp=dataclasses.replace(v.rlp, rollout=dataclasses.replace(
                v.rlp.rollout, thought_len=length[0])))
        results[name] = step0_metrics(v)
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(f"probe {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in results[name].items()), flush=True)
        path.write_text(json.dumps(results, indent=2))
    return results


# Pilots: short RLP runs from the same start, one setting changed at a time from experiments/smollm2.py.
PILOT_STEPS = 30
PILOTS = (
    ("base", {}),
    ("lr3e-5", {"optim.lr": 3e-5}),
    ("T8", {"rlp.rollout.thought_len": 8}),
)


def _override(cfg: RunConfig, changes: dict) -> RunConfig:
    from rlp_jax.config import apply_overrides
    return apply_overrides(cfg, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in changes.items()])


def pilot(workdir: Path, names=None) -> None:
    cfg = base_config(workdir)
    for name, changes in PILOTS:
        if names and name not in names:
            continue
        run_cfg = dataclasses.replace(_override(cfg, changes), train=dataclasses.replace(
            cfg.train, steps=PILOT_STEPS, save_every=10, eval_every=10))
        print(f"== pilot {name} {changes}", flush=True)
        train.run(run_cfg, workdir / "pilots" / name, experiment=f"smollm2_rlp/pilot/{name}")


def report(workdir: Path) -> str:
    lines = ["## Step-0 probe (held-out documents, untrained policy)", "",
             "| setting | prompt tokens | NLL no think | NLL think | info gain | thought len |", "|---|---|---|---|---|---|"]
    probe_file = PROBE_FILE
    for name, r in (json.loads(probe_file.read_text()) if probe_file.exists() else {}).items():
        lines.append(f"| {name} | {r['prompt_tokens']} | {r['eval/nll_no_think']:.3f} | {r['eval/nll_think']:.3f} | "
                     f"{r['eval/info_gain']:.3f} | {r['eval/thought_len']:.1f} |")
    lines += ["", "## Pilots (held-out documents, every eval the run logged)", "",
              "| pilot | step | NLL no think | NLL think | info gain | next-token NLL |", "|---|---|---|---|---|---|"]
    for run_dir in sorted((workdir / "pilots").glob("*")) if (workdir / "pilots").exists() else []:
        f = run_dir / "metrics.jsonl"
        for row in (json.loads(x) for x in f.read_text().splitlines()) if f.exists() else []:
            if "eval/info_gain" in row:
                lines.append(f"| {run_dir.name} | {row['step']} | {row['eval/nll_no_think']:.3f} | "
                             f"{row['eval/nll_think']:.3f} | {row['eval/info_gain']:.3f} | {row['eval/nll_tokens']:.3f} |")
    text = "\n".join(lines) + "\n"
    (workdir / "results.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("probe", "pilot", "report"))
    p.add_argument("--workdir", default="runs/smollm2_rlp")
    p.add_argument("--only", help="comma-separated pilot names")
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.what == "probe":
        probe(workdir)
    elif args.what == "pilot":
        pilot(workdir, args.only.split(",") if args.only else None)
    print(report(workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
