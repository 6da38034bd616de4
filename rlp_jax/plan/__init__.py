"""Memory and FLOPs planner: will a run fit the devices, and what does one step cost?

Modules: `devices` (spec sheets, `--devices` / `--mesh`), `costs` (state, activation and FLOP
accounting; the dense family's), `hybrid_costs` (Nemotron-H's), `estimate` (the `Plan` of one run),
`compile` (`--compile`: the step compiled by XLA for compile-only devices), `roofline` (a compiled program's
FLOPs and HBM bytes with every loop counted as often as it runs: `--compile`'s step time), `cli`
(`python -m rlp_jax.plan`).

    python -m rlp_jax.plan --experiment=web_mix --set model.preset=qwen3-1.7b --devices=v5p-64
    python -m rlp_jax.plan --experiment=smoke --devices=h100x8 --mesh data=2,fsdp=4,tensor=1 --mfu 0.35

Devices: `KIND-N` is a Cloud TPU accelerator type, `KINDxN` is N chips of any kind, a bare KIND is one
chip. In TPU accelerator types the suffix counts TensorCores for v4 and v5p (2 per chip: v5p-64 is 32
chips) and chips for v5e (v5litepod-16) and v6e (v6e-8). GPUs take only `xN` (h100x8). `cpu` is the
host (its RAM as "HBM", no spec peak). Spec values: `DEVICE_KINDS`.

Everything is per device and an *estimate* of what the current code materialises:
  * State: the exact `TrainState` of `rlp_jax.train` (params, AdamW moments in the param dtype, the
    float32 EMA teacher, the KL reference when kl_beta > 0), from `jax.eval_shape`, each leaf divided
    as `rlp_jax.sharding` would shard it on the mesh (a logical axis that does not divide replicates).
    Gradients: one more copy of the params.
  * Activations, per phase of `train_step.rlp_step` (the peak is the largest phase plus the state):
    teacher (EMA forward; the vocabulary projection runs TOKEN_CHUNK positions at a time: [B, chunk, V]
    float32 logits and log-softmax), rollout (prefix KV cache of the local documents, branch KV cache
    of N = K*G branches x T slots, per-step logits), loss (the differentiable document + branch
    forward: per-layer residuals kept for the backward, which depend on model.remat, and then either the
    branch logits of one chunk of THOUGHT_CHUNK thought slots plus the H target slots, [B, N, chunk + H, V]
    float32: logits, temperature-scaled policy logits, log-softmax and cotangent, 4 copies (the chunks
    are rematerialised in the backward), or one layer's working set, whichever is larger: the head's
    backward is done before the layers' starts). Under remat none a dense layer keeps 6 MLP-wide and 2
    float32 residual-wide arrays (as the compiled bar config keeps them). On TPUs arrays are counted as
    XLA:TPU tiles them (`costs.Tiling`): per-head arrays tokens-minor, a thought's cache head_dim-minor.
    Attention scores are dense and masked in this code ([L, L] per document row, [S, L + S] per branch), so
    memory counts them dense. Heads / MLP / vocab-wide activations are divided by the tensor axis (GSPMD follows the
    weights); rows are divided by data x fsdp.
  * FLOPs (model FLOPs, the MFU convention): 2 x (weights of every matmul) per token, + 2 D V per
    token whose logits are computed, + 4 Y H Dh per attended (query, key) pair, counting causal pairs
    only (one document per row; a branch at t attends to t prefix keys and its own tokens, t at the
    mean valid position). Backward = 2 x forward. Thoughts are assumed to use all T slots. The dense
    masked attention of the code executes up to ~2x the attention term (not counted).
  * Step time: FLOPs / (chips x spec peak x MFU), except that sampling is taken no faster than its
    memory-bound floor: T sequential decode steps, each reading all weights and the KV caches from HBM
    (`costs.weight_traffic`: with model.sampler_weights=sharded on an fsdp mesh every step gathers the
    weights again; time on the interconnect is not modelled). `--compile` prints the compiled step's own
    roofline time beside it (`roofline`, `compile.StepRoofline`).
"""

from rlp_jax.plan.cli import format_plan, main
from rlp_jax.plan.costs import (
                                activation_bytes,
                                effective_tokens,
                                forward_flops,
                                matmul_weights,
                                ntp_step_flops,
                                rlp_step_flops,
                                state_bytes,
)
from rlp_jax.plan.devices import (
                                DEVICE_KINDS,
                                GIB,
                                DeviceSpec,
                                default_mesh,
                                device_spec,
                                host_ram,
                                kind_of_jax_device,
                                parse_mesh,
)
from rlp_jax.plan.estimate import Plan, plan

__all__ = ["DEVICE_KINDS", "GIB", "DeviceSpec", "Plan", "activation_bytes", "default_mesh", "device_spec",
           "effective_tokens", "format_plan", "forward_flops", "host_ram", "kind_of_jax_device", "main",
           "matmul_weights", "ntp_step_flops", "parse_mesh", "plan", "rlp_step_flops", "state_bytes"]
