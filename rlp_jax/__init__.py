"""rlp_jax: RLP (reinforcement learning pretraining, arXiv 2510.01265) in JAX."""

from rlp_jax.model_config import ModelConfig
from rlp_jax.model import (Branches, BranchCache, PrefixCache, branch_forward, branches_at, decode_step,
                           forward, init_branch_cache, init_params, param_logical_axes, prefill)

__version__ = "0.1.0"
