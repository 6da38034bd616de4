"""Tiny random Hugging Face checkpoints that tests build and save themselves (no downloads): the dense
families (`make_hf_model`) and Nemotron-H (`tiny_nemotron_h`)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)


def make_hf_model(family: str, *, tied: bool = False, dtype=None, seed: int = 0, **extra):
    """A random Qwen3 / Qwen2 / Llama CausalLM in eval mode (float32 unless dtype is given)."""
    torch.manual_seed(seed)
    if family == "qwen3":
        cfg = transformers.Qwen3Config(**_COMMON, head_dim=8, tie_word_embeddings=tied, rope_theta=10000.0, **extra)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**_COMMON, tie_word_embeddings=tied, rope_theta=10000.0, **extra)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(**_COMMON, tie_word_embeddings=tied, rope_theta=500000.0, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(family)
    # Random norm weights too, so a swapped or ignored norm shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(dtype or torch.float32).eval()
    return model


NEMOTRON_H_BLOCKS = ("linear_attention", "full_attention", "mlp", "linear_attention", "mlp")


def tiny_nemotron_h(seed: int = 0, *, tied: bool = False, blocks=NEMOTRON_H_BLOCKS, **extra):
    """A tiny random NemotronHForCausalLM (float32, eval; Mamba chunk size 8) with randomised norms, dt bias,
    A, D and biases, so a swapped or ignored parameter shows up in the logits. tied: config.json says
    tie_word_embeddings and the head holds a copy of the embedding."""
    torch.manual_seed(seed)
    cfg = transformers.NemotronHConfig(
        vocab_size=128, hidden_size=64, layers_block_type=list(blocks), mamba_num_heads=4, mamba_head_dim=16,
        n_groups=2, ssm_state_size=16, chunk_size=8, conv_kernel=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, use_mamba_kernels=False, tie_word_embeddings=tied, **extra)
    model = transformers.NemotronHForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("A_log"):        # A in (-1, -0.05): slow decay, so state carried across chunks matters
                p.copy_(torch.log(0.05 + 0.95 * torch.rand_like(p)))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn_like(p) - 1.0)
            elif name.endswith(".D") or name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
        if tied:   # transformers never ties Nemotron-H's head (_tied_weights_keys is empty): make it the embedding
            model.lm_head.weight.copy_(model.model.embeddings.weight)
    return model.float().eval()


def hf_logits(model, tokens, attention_mask=None):
    import numpy as np

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens)),
                    attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)))
    return out.logits.float().numpy()
