"""Sampling from the model.

generation  KV-cache generation and streaming, and the categorical samplers
cli         `python -m rlp_jax.generate`: stream completions (optionally thinking first) from a checkpoint
"""
