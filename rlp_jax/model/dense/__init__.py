"""The dense decoder family: Qwen3, Qwen2 and Llama.

config       ModelConfig and the presets (the architecture; numerics from `model.config.Numerics`)
weights      parameter shapes, logical axes, initialisation and assembly from a per-leaf reader
transformer  caches and the forward modes (full, prefill, branch, decode)
hf           Hugging Face names, layouts and config.json (Qwen3 / Qwen2 / Llama), read and written
gguf         GGUF files in (dequantized with the `gguf` package) and their tokenizers
interface    this family behind `rlp_jax.model.family.Family`
"""
