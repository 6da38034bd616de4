"""The models: one folder per family behind one interface (`family`), the layers they share beside them.

family           the model interface RLP, training and evaluation call, dispatched over `FAMILIES`
config           `Numerics`: dtypes, rematerialisation and attention, declared once for every family
dense/           Qwen3 / Qwen2 / Llama (config, weights, transformer, hf, gguf, interface)
nemotron_h/      NVIDIA Nemotron-H (hybrid, branch, hf, interface)
layers           RMSNorm, RoPE, the MLP and the three attention kinds
blockwise        attention over key blocks (online softmax) for long key sets
kernels          accelerator attention kernels (splash on TPU, cuDNN on GPU) behind model.attention=kernel
mamba2           the Mamba-2 mixer: chunked SSD scan, the state after any position, the recurrent step
branches         `Branches`: where each thought hangs off its document's prefix, in every family
scoring          token log-probs of a sequence under the model (full and chunked over the vocabulary)
sampling         the categorical sampler and logit filters (top-k / top-p), shared by generation and thoughts
safetensors_io   Hugging Face weight folders read and written (every family's reader and writer)

A third family is one folder (config, weights, forward, hf, interface) and one entry in `family.FAMILIES`
(docs/model_families.md lists what each file provides).
Imports flow one way: `rlp_jax.model` never imports `rlp`, `train` or `evaluate`.
"""
