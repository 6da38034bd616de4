"""Tiny random Hugging Face checkpoints that tests build and save themselves (no downloads)."""

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


def hf_logits(model, tokens, attention_mask=None):
    import numpy as np

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens)),
                    attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)))
    return out.logits.float().numpy()
