"""The method: RLP's pure functions over arrays (docs/method.md).

config      RolloutConfig, RewardConfig, LossConfig, PromptConfig, RLPConfig (one declaration per setting)
prompt      the prompted setting: the context the policy thinks after
positions   which positions of a row think
rollout     sampling G thoughts per position off the shared prefix, and scoring them differentiably
teacher     the EMA teacher: its update and its no-think log-probs (S_ema)
reward      information gain and the other rewards
advantages  group-relative (and batch) advantages
losses      the clipped policy-gradient loss on thought tokens, NTP losses
objective   one RLP step's math: rollout phase, rewards and advantages, the differentiable objective
naive       the naive path (every thought its own sequence), the shared-prefix path's reference

Depends on `rlp_jax.model` and `rlp_jax.generate`; never on `train` or `evaluate`.
"""
