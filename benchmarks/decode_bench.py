"""Benchmark: decode throughput of `rlp_jax.generate.generation.generate` vs transformers' `generate` (PyTorch, CPU).

Usage (from the repository root):

    python benchmarks/decode_bench.py                          # small config, batches 16 and 64
    python benchmarks/decode_bench.py --config tiny,small --output decode.md
    python benchmarks/decode_bench.py --quick                  # smoke run: tiny, batch 4, 16+16 tokens

The checkpoint: a random `Qwen3ForCausalLM` built with transformers from a `Qwen3Config` with the shapes
of our `ModelConfig.preset(NAME)` (tied embeddings, rope theta 1e4, qk-norm, float32; norm weights
randomised around 1 as in tests/hf_models.py), saved with `save_pretrained` (safetensors) to a temporary
directory. Both sides load that same directory: transformers with `from_pretrained`, ours with
`rlp_jax.model.dense.hf.from_hf`.

    tiny:  vocab 512,  hidden 64,  intermediate 128, 2 layers, 4 heads, 2 kv heads, head_dim 16
    small: vocab 4096, hidden 256, intermediate 768, 4 layers, 8 heads, 4 kv heads, head_dim 32

What is timed, per config and batch size B: B random prompts of exactly P tokens (no padding) and
exactly J new tokens each (no stop ids on either side), sampled at temperature 1.0 with no top-k/top-p
filtering:

  ours:  `jax.jit(generate)` (prefill + one `lax.while_loop` of J decode steps), compiled first with
         `.lower().compile()` (compile time reported separately) and called once untimed.
  transformers: `model.generate(input_ids, attention_mask, do_sample=True, temperature=1.0, top_k=0,
         top_p=1.0, max_new_tokens=J, min_new_tokens=J, eos_token_id=None, use_cache=True)` in float32
         (default sdpa attention, DynamicCache) under `torch.inference_mode()`, `model.eval()`, with
         `torch.set_num_threads(cores)` and with 1 thread (`--torch-threads`), each called once untimed.
         OMP_WAIT_POLICY defaults to PASSIVE (see below the imports): with PyTorch's default
         busy-waiting OpenMP threads, torch at threads = cores ran 30-200x slower whenever other
         processes shared the cores, which would flatter our ratio.

Then `--repeats` interleaved rounds, each one timed call of ours followed by one of each torch setting
(under `jax.block_until_ready` for ours), so that both sides see the same load: on a shared machine the
speed of both drifts by +-30% within minutes, and timing one side's calls minutes after the other's
moved the ratio from 2.7x to 4.0x between runs (2026-12-02).

tokens/s = B * J / wall time of the whole call (prefill included on both sides). The table reports the
best (fastest) call of each side with the median in parentheses; "ratio, best vs best" divides the
fastest transformers call by our fastest; "ratio per round" divides, in each round, the faster
transformers call by ours of that round, and gives the median and range of those ratios. The 1-minute
load average at the start and end is printed (numbers taken with a load above the core count are noisy,
for both sides). The prefill alone (ours: jitted `transformer.prefill`; transformers: one forward with
`use_cache=True, logits_to_keep=1`, as `generate` does, with the torch setting of the faster generate
call) is timed after the rounds and reported for context.

Where our time goes (projections, cache read, MLP, LM head, sampling): benchmarks/decode_profile.py.

Correctness, in the same run: greedy decoding (ours temperature 0; transformers do_sample=False) of a
batch of 2 prompts of P tokens for 16 new tokens; prints the token match rate, the number of identical
sequences and the largest difference of the first next-token logits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# PyTorch's OpenMP threads busy-wait at every parallel region by default. On a machine whose cores
# are shared with other processes that makes torch with threads = cores 30-200x slower (one spinning
# thread waits for a descheduled one); passive waiting removes that artefact. Set before torch loads
# its OpenMP runtime; an OMP_WAIT_POLICY already in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from rlp_jax.generate.generation import SamplingConfig, generate, pad_prompts  # noqa: E402
from rlp_jax.model.dense import transformer  # noqa: E402
from rlp_jax.model.dense.config import ModelConfig  # noqa: E402
from rlp_jax.model.dense.hf import from_hf  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------------

def qwen3_config(preset: str) -> transformers.Qwen3Config:
    """A Qwen3Config with the shapes of `ModelConfig.preset(preset)`."""
    c = ModelConfig.preset(preset)
    return transformers.Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=4096, initializer_range=0.02,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def save_checkpoint(preset: str, directory: str, seed: int) -> transformers.Qwen3Config:
    torch.manual_seed(seed)
    hf_cfg = qwen3_config(preset)
    m = transformers.Qwen3ForCausalLM(hf_cfg)
    with torch.no_grad():                       # random norm weights, as tests/hf_models.py
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    m.to(torch.float32).save_pretrained(directory, safe_serialization=True)
    return hf_cfg


def load_real(name: str):
    """(transformers model, (ModelConfig, params)) of one real checkpoint, both float32: a Hugging Face
    folder, or a .gguf file that transformers dequantizes with its own GGUF loader."""
    from rlp_jax.model.dense.gguf import is_gguf
    from rlp_jax.runs.loading import load_pretrained, resolve_model_name

    path = Path(resolve_model_name(name))
    if is_gguf(path):
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                     dtype=torch.float32)
    else:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg, params = load_pretrained(path)
    return hf_model.eval(), (cfg, jax.tree.map(jnp.asarray, params))


def describe(hf_cfg) -> str:
    return (f"vocab {hf_cfg.vocab_size}, hidden {hf_cfg.hidden_size}, intermediate {hf_cfg.intermediate_size}, "
            f"{hf_cfg.num_hidden_layers} layers, {hf_cfg.num_attention_heads} heads, "
            f"{hf_cfg.num_key_value_heads} kv heads, head_dim {hf_cfg.head_dim}, "
            f"tied {hf_cfg.tie_word_embeddings}")


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def timed(fn, repeats: int):
    """(times, last output) of `repeats` calls of fn()."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


class Ours:
    def __init__(self, cfg, params):
        self.cfg, self.params = cfg, params
        self._jitted = {}

    def fn(self, sc: SamplingConfig):
        if sc not in self._jitted:
            self._jitted[sc] = jax.jit(lambda p, x, n, k: generate(p, self.cfg, x, n, k, sc))
        return self._jitted[sc]

    def compile(self, sc, prompts, lens, rng):
        t0 = time.perf_counter()
        compiled = self.fn(sc).lower(self.params, prompts, lens, rng).compile()
        return compiled, time.perf_counter() - t0

    def prefill_fn(self, j: int):
        return jax.jit(lambda p, x, n: transformer.prefill(p, self.cfg, x, n, j))


def hf_generate(m, input_ids, *, new_tokens: int, sample: bool, seed: int = 0):
    gc = transformers.GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sample,
        temperature=1.0 if sample else None, top_k=0 if sample else None, top_p=1.0 if sample else None,
        eos_token_id=None, bos_token_id=None, pad_token_id=0, use_cache=True, num_beams=1)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = m.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gc)
    return out[:, input_ids.shape[1]:]


def hf_prefill(m, input_ids):
    with torch.inference_mode():
        return m(input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True, logits_to_keep=1)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def greedy_check(ours: Ours, hf_model, vocab: int, prompt_len: int, rng: np.random.RandomState,
                 batch: int = 2, new_tokens: int = 16) -> str:
    prompts = rng.randint(0, vocab, (batch, prompt_len)).astype(np.int32)
    x, n = pad_prompts(prompts.tolist(), multiple=prompt_len)
    sc = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    got = np.asarray(ours.fn(sc)(ours.params, jnp.asarray(x), jnp.asarray(n), jax.random.key(0)).tokens)
    ids = torch.as_tensor(prompts, dtype=torch.long)
    ref = hf_generate(hf_model, ids, new_tokens=new_tokens, sample=False).numpy()
    first_ours = np.asarray(jax.jit(lambda p, a, b: transformer.prefill(p, ours.cfg, a, b, 1)[0])(
        ours.params, jnp.asarray(x), jnp.asarray(n)))
    first_hf = hf_prefill(hf_model, ids).logits[:, -1].float().numpy()
    same = got == ref
    return (f"greedy check (batch {batch}, prompt {prompt_len}, {new_tokens} new tokens): token match rate "
            f"{same.mean():.3f} ({int(same.sum())}/{same.size}), identical sequences "
            f"{int(same.all(axis=1).sum())}/{batch}, max |first-step logit diff| "
            f"{float(np.abs(first_ours - first_hf).max()):.2e} (logit scale {float(np.abs(first_hf).max()):.2f})")


def fmt_rate(times, tokens):
    return f"{tokens / min(times):,.0f} ({tokens / statistics.median(times):,.0f})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", help="comma-separated presets: tiny, small (default: small)")
    p.add_argument("--checkpoint", default=None,
                   help="a real model instead of the presets: HF folder, .gguf file or model name (smollm2); "
                        "transformers loads the same file (GGUF through its own loader)")
    p.add_argument("--batches", default="16,64", help="comma-separated batch sizes (default: 16,64)")
    p.add_argument("--prompt-len", type=int, default=128, help="P, prompt tokens (all prompts this long)")
    p.add_argument("--new-tokens", type=int, default=128, help="J, new tokens per sequence")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved timing rounds (one call of ours and of each torch setting per round)")
    p.add_argument("--torch-threads", default=f"{os.cpu_count()},1",
                   help="comma-separated torch.set_num_threads values to time (default: cores,1); the ratio "
                        "is taken against the fastest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the Markdown report to this file")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, batch 4, 16 prompt + 16 new tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.batches, args.prompt_len, args.new_tokens, args.repeats = "tiny", "4", 16, 16, 2
    presets = [c for c in args.config.split(",") if c]
    batches = [int(b) for b in args.batches.split(",") if b]
    args.torch_threads = list(dict.fromkeys(int(t) for t in args.torch_threads.split(",") if t))
    torch.set_num_threads(args.torch_threads[0])
    load_start = os.getloadavg()
    t_wall = time.perf_counter()
    log(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"(threads {args.torch_threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
        f"transformers {transformers.__version__}; "
        f"{os.cpu_count()} CPUs; load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")

    rows, notes = [], []
    rng = np.random.RandomState(args.seed)
    for preset in ([args.checkpoint] if args.checkpoint else presets):
        if args.checkpoint:
            hf_model, (cfg, params) = load_real(args.checkpoint)
            hf_cfg = hf_model.config
        else:
            with tempfile.TemporaryDirectory(prefix=f"decode_bench_{preset}_") as ckpt:
                hf_cfg = save_checkpoint(preset, ckpt, args.seed)
                hf_model = transformers.Qwen3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
                cfg, params = from_hf(ckpt)
        ours = Ours(cfg, params)
        notes.append(f"`{preset}`: {type(hf_model).__name__}, {describe(hf_cfg)}; {cfg.num_params() / 1e6:.2f}M params; "
                     f"transformers attention {hf_model.config._attn_implementation}")
        log(f"[{preset}] {notes[-1]}")
        check = greedy_check(ours, hf_model, cfg.vocab_size, args.prompt_len, rng)
        notes.append(f"`{preset}` {check}")
        log(f"[{preset}] {check}")

        for b in batches:
            prompts = rng.randint(0, cfg.vocab_size, (b, args.prompt_len)).astype(np.int32)
            x, n = (jnp.asarray(a) for a in pad_prompts(prompts.tolist(), multiple=args.prompt_len))
            ids = torch.as_tensor(prompts, dtype=torch.long)
            j = args.new_tokens
            tokens = b * j
            sc = SamplingConfig(max_new_tokens=j, temperature=1.0, top_k=0, top_p=1.0)

            log(f"[{preset} B={b}] ours: compiling ...")
            compiled, c_s = ours.compile(sc, x, n, jax.random.key(args.seed))
            jax.block_until_ready(compiled(params, x, n, jax.random.key(args.seed)))       # warm-up
            # The keys are split out before timing (indexing a key array dispatches, and compiles once).
            keys = iter([k for k in jax.random.split(jax.random.key(args.seed + 1), args.repeats)])
            run_ours = lambda: jax.block_until_ready(compiled(params, x, n, next(keys)))
            seeds = iter(range(args.seed + 1, args.seed + 1 + args.repeats * len(args.torch_threads)))

            def run_hf(threads):
                torch.set_num_threads(threads)
                return hf_generate(hf_model, ids, new_tokens=j, sample=True, seed=next(seeds))

            for threads in args.torch_threads:
                log(f"[{preset} B={b}] transformers ({threads} threads): warm-up ...")
                torch.set_num_threads(threads)
                hf_generate(hf_model, ids, new_tokens=j, sample=True, seed=args.seed)
            # Interleaved rounds: ours, then each transformers setting, `repeats` times, so that both
            # sides see the same load on a shared machine; a round's ratio compares calls seconds apart.
            t_ours, hf_gen = [], {t: [] for t in args.torch_threads}
            for r in range(args.repeats):
                (dt,), out = timed(run_ours, 1)
                t_ours.append(dt)
                assert int(out.lengths.min()) == j, "ours stopped early"
                for threads in args.torch_threads:
                    (dt,), out_hf = timed(lambda: run_hf(threads), 1)
                    assert tuple(out_hf.shape) == (b, j), f"transformers generated {tuple(out_hf.shape)}"
                    hf_gen[threads].append(dt)
                log(f"[{preset} B={b}] round {r + 1}/{args.repeats}: ours {t_ours[-1]:.3f}s, transformers "
                    + ", ".join(f"{t} thr {hf_gen[t][-1]:.3f}s" for t in args.torch_threads))
            rounds = [min(hf_gen[t][r] for t in args.torch_threads) / t_ours[r] for r in range(args.repeats)]

            pre = ours.prefill_fn(j)
            jax.block_until_ready(pre(params, x, n))
            t_pre_ours, _ = timed(lambda: jax.block_until_ready(pre(params, x, n)), args.repeats)
            best = min(hf_gen, key=lambda t: min(hf_gen[t]))      # the reported torch setting
            t_hf = hf_gen[best]
            torch.set_num_threads(best)
            hf_prefill(hf_model, ids)
            t_pre_hf, _ = timed(lambda: hf_prefill(hf_model, ids), args.repeats)
            rows.append([preset, str(b), fmt_rate(t_ours, tokens)]
                        + [fmt_rate(hf_gen[t], tokens) for t in args.torch_threads]
                        + [f"{min(t_hf) / min(t_ours):.2f}x",
                           f"{statistics.median(rounds):.2f}x ({min(rounds):.2f}-{max(rounds):.2f})",
                           f"{c_s:.2f}", f"{1e3 * min(t_pre_ours):.1f} / {1e3 * min(t_pre_hf):.1f} ({best} thr)"])

    load_end = os.getloadavg()
    header = (["config", "batch", "ours tok/s best (median)"]
              + [f"transformers {t} thr tok/s best (median)" for t in args.torch_threads]
              + ["ratio, best vs best", "ratio per round, median (min-max)", "ours compile s",
                 "prefill ms ours / transformers"])
    lines = [f"Decode throughput: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens sampled at "
             f"temperature 1.0 (no top-k/top-p, no stop ids), float32, {args.repeats} interleaved rounds "
             f"(one call of each side per round; tok/s best, median in parentheses); tok/s = batch x new "
             f"tokens / wall time of the whole generate call. Ratio per round: the faster transformers call "
             f"of the round over ours of the same round.",
             "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"- {note}" for note in notes]
    lines.append(f"- jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
                 f"(threads {args.torch_threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
                 f"transformers {transformers.__version__}, "
                 f"{os.cpu_count()} CPUs; load average (1/5/15 min) {load_start[0]:.2f}/{load_start[1]:.2f}/"
                 f"{load_start[2]:.2f} at start, {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} at end "
                 f"(> {os.cpu_count()} means other processes competed for the CPUs); wall "
                 f"{time.perf_counter() - t_wall:.0f}s")
    report = "\n".join(lines)
    print(report)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(report + "\n")


if __name__ == "__main__":
    main()
