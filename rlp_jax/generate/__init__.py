"""Sampling from the model.

generation  KV-cache generation and streaming (the categorical samplers are `rlp_jax.model.sampling`)
cli         `python -m rlp_jax.generate`: stream completions (optionally thinking first) from a checkpoint
"""
