"""lm-evaluation-harness on rlp_jax checkpoints, with lm-eval's own command line:

    python -m rlp_jax.lm_eval --model_args checkpoint=RUN_DIR_OR_HF_DIR_OR_GGUF[,which=ema,step=N,think=true] \
        --tasks hellaswag,gsm8k [--num_fewshot N] [--limit N] [--batch_size N] [--include_path DIR] \
        [--log_samples --output_path OUT]

Every flag is lm-eval's (`lm-eval run --help`); `--model` defaults to `rlp_jax`, the adapter in
`rlp_jax.evaluate.harness` (its model args are listed there). `python -m rlp_jax.lm_eval ls tasks` lists
lm-eval's tasks. Needs the `lm_eval` extra: `pip install 'rlp_jax[lm_eval]'`.
"""

from __future__ import annotations

import sys

SUBCOMMANDS = ("run", "ls", "validate")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        print(f"error: rlp_jax.lm_eval needs lm-evaluation-harness ({e}); install it with "
              "pip install 'rlp_jax[lm_eval]'", file=sys.stderr)
        return 2
    from rlp_jax.evaluate import harness  # noqa: F401  (registers the `rlp_jax` model with lm-eval)
    from rlp_jax.runs.loading import LOAD_ERRORS

    if not argv or argv[0] not in SUBCOMMANDS:
        argv = ["run", *argv]
    if argv[0] == "run" and not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        argv[1:1] = ["--model", "rlp_jax"]
    sys.argv = ["python -m rlp_jax.lm_eval", *argv]
    try:
        cli_evaluate()
    except LOAD_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
