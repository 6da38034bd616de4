"""NVIDIA Nemotron-H: Mamba-2 / attention / MLP blocks.

hybrid     HybridConfig and the presets, Hugging Face weights in, the forward over the blocks
branch     thoughts branched off a Nemotron-H prefix: SSM states at t, attention keys shared, decode
hf         params back to a transformers `NemotronHForCausalLM` folder
interface  this family behind `rlp_jax.model.family.Family`
"""
