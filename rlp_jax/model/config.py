"""How every model family stores and runs: `Numerics` (dtypes, rematerialisation, attention), declared once.

Each family's config (`dense.config.ModelConfig`, `nemotron_h.hybrid.HybridConfig`) inherits it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rlp_jax.model import blockwise

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPES = tuple(_DTYPES)                 # storage and compute dtypes (float16 needs loss scaling: not offered)
REMATS = ("none", "full", "dots")       # rematerialisation of the blocks (`transformer`): none, all, keep matmuls
ATTENTIONS = ("auto", "dense", "blockwise", "kernel")   # full/branch attention: see ModelConfig.attention
SAMPLER_WEIGHTS = ("sharded", "gathered")              # how token loops read the weights: see Numerics


@dataclasses.dataclass(frozen=True, kw_only=True)
class Numerics:
    """How a model stores and runs, for both families (`ModelConfig`, `hybrid.HybridConfig`).

    Attributes:
      param_dtype: storage dtype of parameters ("float32" or "bfloat16").
      compute_dtype: dtype of activations and matmuls; log-probabilities are always float32.
      remat: per-layer rematerialisation: "none", "full" (save only layer inputs) or "dots"
        (save matmul outputs without batch dimensions).
      attention: how full and branch attention read their keys: "dense" (one score array), "blockwise"
        (online softmax over key blocks of `attention_block`, `rlp_jax.model.blockwise`) or "auto"
        (blockwise where the keys are longer than one block). Single-query decoding is dense always.
        "kernel": full attention through the accelerator's kernel (`rlp_jax.model.kernels`: splash on TPU,
        cuDNN on GPU, XLA's attention elsewhere) where it applies, "auto" wherever it does not (branch
        attention, a prompt context, lengths or dtypes the kernel refuses).
      attention_block: the key block (and query chunk) of blockwise attention.
      sampler_weights: how the token loops of sampling (`thought_rollout`, `generate`) read the weights:
        "sharded" as stored (on an fsdp mesh XLA gathers them at every token), "gathered" cast to the compute
        dtype and gathered once before the loop (`family.sampling_params`, `sharding.gathered`): the same
        tokens, the whole model in the compute dtype held while sampling.
    """

    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    attention_block: int = 512
    sampler_weights: str = "sharded"

    # Fields a checkpoint may be resumed with a different value of (how it runs, not what it stores).
    RESUMABLE_WITH_OTHER = ("remat", "compute_dtype", "max_position_embeddings", "attention", "attention_block",
                            "sampler_weights")

    def stored_fields(self) -> dict[str, Any]:
        """The fields that must match to resume a checkpoint: shapes and storage dtype."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RESUMABLE_WITH_OTHER}

    def check_numerics(self) -> None:
        """ValueError (one line) for an unknown dtype, remat, attention or sampler_weights."""
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name} must be {' or '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.remat not in REMATS:
            raise ValueError(f"model.remat must be {', '.join(REMATS[:-1])} or {REMATS[-1]}, got {self.remat!r}")
        if self.attention not in ATTENTIONS or self.attention_block < 1:
            raise ValueError(f"model.attention must be {', '.join(ATTENTIONS)} and model.attention_block >= 1, got "
                             f"{self.attention!r}, {self.attention_block}")
        if self.sampler_weights not in SAMPLER_WEIGHTS:
            raise ValueError(f"model.sampler_weights must be {' or '.join(SAMPLER_WEIGHTS)}, got "
                             f"{self.sampler_weights!r}")

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_compute_dtype(self):
        return _DTYPES[self.compute_dtype]

    def blockwise_for(self, num_keys: int) -> bool:
        """Whether attention over `num_keys` keys runs blockwise (see `attention`)."""
        return self.attention == "blockwise" or (self.attention in ("auto", "kernel") and num_keys > self.attention_block)

    @property
    def decode_block(self) -> int:
        """Cache slots a sampling step reads at a time (`blockwise.attend_filled`): up to the last filled block."""
        return min(self.attention_block, blockwise.DECODE_BLOCK)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def checkpointed(self, block_fn, *, unrolled: bool = False):
        """block_fn rematerialised as `remat` says (the backward recomputes what it does not save). unrolled: the
        blocks are a Python loop, not a `lax.scan` body; then XLA must be kept from merging the recomputation
        with the forward (`prevent_cse`), which would keep every block's activations (the remat undone)."""
        if self.remat == "none":
            return block_fn
        policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "dots"
                  else jax.checkpoint_policies.nothing_saveable)
        return jax.checkpoint(block_fn, policy=policy, prevent_cse=unrolled)
