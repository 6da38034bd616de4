"""The dense decoder's configuration: one frozen dataclass for Qwen3, Qwen2 and Llama.

The names follow Hugging Face's `config.json` where a field has a direct counterpart, so that
`rlp_jax.model.dense.hf.from_hf` is a plain mapping. Presets for public Qwen3 sizes and three CPU-sized models
are classmethods (`ModelConfig.preset("qwen3-1.7b")`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlp_jax.model.config import Numerics


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(Numerics):
    """Shape and numerics of a decoder-only transformer.

    Attributes:
      vocab_size: V, rows of the embedding matrix.
      hidden_size: D, the residual width.
      intermediate_size: F, the SwiGLU width.
      num_layers: number of transformer blocks (stacked on a leading `layers` axis and scanned).
      num_heads: H, query heads.
      num_kv_heads: Hk, key/value heads (grouped-query attention; H % Hk == 0).
      head_dim: Dh, width of one head (Qwen3 sets it independently of D / H).
      rope_theta: base of the rotary frequencies.
      rope_scaling: None, or Hugging Face's `rope_scaling` dict of type "llama3" (Llama 3.1+).
      rms_norm_eps: epsilon of every RMSNorm.
      qk_norm: per-head RMSNorm on queries and keys before rotary (Qwen3: True; Qwen2/Llama: False).
      attention_bias: bias on the q/k/v projections (Qwen2: True).
      tie_word_embeddings: the output projection is the transposed embedding matrix.
      max_position_embeddings: the context length the checkpoint declares (carried from Hugging Face /
        GGUF into exports; attention itself has no length limit).
      param_dtype, compute_dtype, remat, attention, attention_block, sampler_weights: `Numerics`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    qk_norm: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                             f"model.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        self.check_numerics()
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(f"model.rope_scaling type {kind!r} is not supported (supported: llama3, default)")

    @property
    def q_per_kv(self) -> int:
        """A = Q / E, query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Exact parameter count of `init_params(self, ...)`."""
        d, f, h, hk, dh, v = (self.hidden_size, self.intermediate_size, self.num_heads,
                              self.num_kv_heads, self.head_dim, self.vocab_size)
        attn = d * h * dh + 2 * d * hk * dh + h * dh * d
        if self.attention_bias:
            attn += h * dh + 2 * hk * dh
        if self.qk_norm:
            attn += 2 * dh
        layer = attn + 3 * d * f + 2 * d
        total = self.num_layers * layer + v * d + d
        if not self.tie_word_embeddings:
            total += v * d
        return total

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named size: qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b (public config.json shapes), tiny, mini, small."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                     qk_norm=True, attention_bias=False, num_kv_heads=8)
PRESETS: dict[str, dict[str, Any]] = {
    # Shapes from the public Qwen3 config.json files.
    "qwen3-0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_layers=28,
                       num_heads=16, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_layers=28,
                       num_heads=16, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_layers=36,
                     num_heads=32, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_layers=36,
                     num_heads=32, tie_word_embeddings=False),
    # CPU-sized Qwen3-style models for tests, the demo and benchmarks.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=10_000.0),
    # The running-sum study's model (experiments/modsum_rlp): 0.4M parameters, learns the step skill in minutes.
    "mini": dict(vocab_size=32, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=32, rope_theta=10_000.0),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                  num_kv_heads=4, head_dim=32, rope_theta=10_000.0),
}
