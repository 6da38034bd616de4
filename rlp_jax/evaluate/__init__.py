"""Evaluation of checkpoints.

decoder  batched prompted completion and answer log-prob scoring for one model
tasks    benchmark readers, prompts and scoring (MMLU, GPQA, GSM8K, the generated problems)
answers  answer extraction and equivalence, pass@k
heldout  the generated corpus's before/after table (held-out documents and problems)
modsum   the running-sum task's evaluation (the study's and the demo's numbers)
harness  the lm-evaluation-harness model over rlp_jax (`python -m rlp_jax.lm_eval`)
cli      `python -m rlp_jax.evaluate`
"""
