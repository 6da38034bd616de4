"""The decoder-only transformer and its interop.

config       ModelConfig and the presets (the architecture, dtypes, remat)
layers       RMSNorm, RoPE, the MLP and the three attention kinds
transformer  params, caches and the forward modes (full, prefill, branch, decode)
scoring      token log-probs of a sequence under the model (full and chunked over the vocabulary)
sampling     the categorical sampler and logit filters (top-k / top-p), shared by generation and thoughts
hf           Hugging Face safetensors checkpoints in and out (Qwen3 / Qwen2 / Llama)
gguf         GGUF files in (dequantized with the `gguf` package) and their tokenizers
kernels      accelerator attention kernels (splash on TPU, cuDNN on GPU) behind model.attention=kernel
mamba2       the Mamba-2 mixer: chunked SSD scan, the state after any position, the recurrent step
hybrid       NVIDIA Nemotron-H (Mamba-2 / attention / MLP blocks): config, HF weights in, forward
hybrid_branch  thoughts branched off a Nemotron-H prefix: SSM states at t, attention keys shared, decode

Imports flow one way: `rlp_jax.model` never imports `rlp`, `train` or `evaluate`.
"""
