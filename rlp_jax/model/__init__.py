"""The decoder-only transformer and its interop.

config       ModelConfig and the presets (the architecture, dtypes, remat)
layers       RMSNorm, RoPE, the MLP and the three attention kinds
transformer  params, caches and the forward modes (full, prefill, branch, decode)
scoring      token log-probs of a sequence under the model (full and chunked over the vocabulary)
hf           Hugging Face safetensors checkpoints in and out (Qwen3 / Qwen2 / Llama)
gguf         GGUF files in (dequantized with the `gguf` package) and their tokenizers

Imports flow one way: `rlp_jax.model` never imports `rlp`, `train` or `evaluate`.
"""
