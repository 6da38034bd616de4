"""The planner (`rlp_jax.plan`): parameter counts against real models, per-leaf sharded state sizes,
hand-computed bytes and FLOPs of the tiny preset, and the command line."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from rlp_jax import plan, sharding
from rlp_jax.model.dense import transformer
from rlp_jax.model.dense.config import PRESETS, ModelConfig
from rlp_jax.runs.config import (
    ConfigError,
    ModelSection,
    apply_overrides,
    load_experiment,
)
from rlp_jax.runs.loading import model_config

ROOT = Path(__file__).resolve().parents[1]

# Public Qwen3 config.json values (huggingface.co/Qwen/Qwen3-*/config.json), written out independently of
# PRESETS so a wrong preset shows up; tiny/small have no public config and use their preset values.
_QWEN3_PUBLIC = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     tie_word_embeddings=False),
}


def _hf_config(name: str) -> dict:
    if name in _QWEN3_PUBLIC:
        return dict(_QWEN3_PUBLIC[name], vocab_size=151936, num_key_value_heads=8, head_dim=128)
    p = PRESETS[name]
    return dict(vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
                num_hidden_layers=p["num_layers"], num_attention_heads=p["num_heads"],
                num_key_value_heads=p["num_kv_heads"], head_dim=p["head_dim"], tie_word_embeddings=True)


def _run_config(*overrides):
    return apply_overrides(load_experiment("smoke").config(), list(overrides))


# ---- (1) parameter counts ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_num_params_matches_initialised_model(name):
    cfg = ModelConfig.preset(name)
    if name in ("tiny", "small"):
        leaves = jax.tree.leaves(transformer.init_params(cfg, jax.random.key(0)))
    else:
        leaves = jax.tree.leaves(jax.eval_shape(lambda k: transformer.init_params(cfg, k), jax.random.key(0)))
    assert sum(math.prod(x.shape) for x in leaves) == cfg.num_params()


@pytest.mark.parametrize("name", list(PRESETS))
def test_num_params_matches_hugging_face(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf_model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_hf_config(name)))
    hf_count = sum(p.numel() for p in hf_model.parameters())     # a tied head is counted once
    assert hf_count == ModelConfig.preset(name).num_params()


# ---- (2) sharded state sizes --------------------------------------------------------------------

def test_params_per_device_halve_when_fsdp_doubles():
    cfg = _run_config("model.preset=qwen3-0.6b")
    m = model_config(cfg.model)
    four = plan.state_bytes(cfg, m, {"data": 1, "fsdp": 4, "tensor": 1})
    eight = plan.state_bytes(cfg, m, {"data": 1, "fsdp": 8, "tensor": 1})
    for key in ("params", "optimizer", "ema", "gradients"):
        assert eight[key] == pytest.approx(four[key] / 2, rel=1e-3)
        assert eight[key] > four[key] / 2          # norm weights are replicated, not divided
    # Rules, not a blanket divide: tiny's width 64 does not divide by 128, so every leaf replicates.
    cfg = _run_config()
    m = model_config(cfg.model)
    one = plan.state_bytes(cfg, m, {"data": 1, "fsdp": 1, "tensor": 1})
    many = plan.state_bytes(cfg, m, {"data": 1, "fsdp": 128, "tensor": 1})
    assert many["params"] == one["params"]


# ---- (3) the tiny preset by hand -----------------------------------------------------------------

# tiny: V=512, D=64, F=128, Y=2 layers, H=4, Hk=2, Dh=16, tied embeddings.
# Matmul weights per layer: q 64*4*16 + k 64*2*16 + v 64*2*16 + o 4*16*64 + gate/up/down 3*64*128 = 36864.
# Norm weights: attn/mlp norms 2*2*64 + q/k norms 2*2*16 + final 64 = 384.
# Parameters: 2*36864 + 512*64 (embedding) + 384 = 106880; matmul parameters N = 106880 - 384 = 106496.
TINY_PARAMS, TINY_NORMS, TINY_N = 106880, 384, 106496


def test_tiny_by_hand():
    cfg = _run_config()                 # smoke: tiny, float32, B=8, L=64, K=2, G=4, T=8, H=1
    m = model_config(cfg.model)
    assert m.num_params() == TINY_PARAMS
    p1 = plan.plan(cfg, plan.device_spec("cpu"), {"data": 1, "fsdp": 1, "tensor": 1})
    assert p1.state["params"] == 4 * TINY_PARAMS
    assert p1.state["ema"] == 4 * TINY_PARAMS
    # AdamW mu and nu in the param dtype, plus three int32 counters (train step, adam, schedule).
    assert p1.state["optimizer"] == 2 * 4 * TINY_PARAMS + 3 * 4
    p2 = plan.plan(cfg, plan.device_spec("cpux2"), {"data": 1, "fsdp": 2, "tensor": 1})
    assert p2.state["params"] == 4 * (TINY_N // 2 + TINY_NORMS)      # matrices split in two, norms replicated
    assert p2.rows_per_device == 4

    # NTP step = 6 N tokens + attention: 3 (fwd + bwd) x 4 Y H Dh per causal pair, B L (L+1)/2 pairs.
    tokens, pairs = 8 * 64, 8 * 64 * 65 // 2
    assert p1.ntp_flops == 6 * TINY_N * tokens + 3 * (4 * 2 * 4 * 16) * pairs == 352_714_752
    # The reward part is the EMA teacher's forward over the same tokens: one third of an NTP step.
    assert p1.rlp_flops["reward"] == pytest.approx(p1.ntp_flops / 3, rel=1e-12)
    # Paper's effective tokens: K*G rollouts of L + T tokens per row, plus the input tokens.
    assert p1.effective_tokens == 2 * 4 * (64 + 8) * 8 + 8 * 64


def test_sampler_weights_trade_rollout_memory_for_weight_traffic():
    """model.sampler_weights: "gathered" holds every weight in the compute dtype during the rollout and reads it
    once per sampled token; "sharded" reads each fsdp shard (float32 here) and writes and reads the gathered
    bfloat16 copy at every token. By hand on the paper config (Qwen3-1.7B, v5p-64 as 32-way fsdp)."""
    sets = ["train.micro_batches=2"]
    cfg = {w: apply_overrides(load_experiment("web_mix").config(), sets + [f"model.sampler_weights={w}"])
           for w in ("sharded", "gathered")}
    devices, mesh = plan.device_spec("v5p-64"), {"data": 1, "fsdp": 32, "tensor": 1}
    p = {w: plan.plan(c, devices, mesh) for w, c in cfg.items()}
    n = p["gathered"].num_params
    steps = 2 * 2048                                  # micro-batches x thought slots
    per_token = (4 * n / 32 + 2 * 2 * n) - 2 * n      # sharded's weight bytes per token minus gathered's
    assert p["sharded"].decode_floor_s - p["gathered"].decode_floor_s == pytest.approx(
        steps * per_token / devices.bandwidth, rel=1e-9)
    m = model_config(cfg["sharded"].model)
    two_layers_and_head = 2 * (2 * (n - m.vocab_size * m.hidden_size - m.hidden_size) / m.num_layers
                               + m.vocab_size * m.hidden_size)
    extra = p["gathered"].activations["rollout"] - p["sharded"].activations["rollout"]
    assert 0 < extra <= 2 * n - two_layers_and_head + 1     # the whole model replaces two layers and the head
    assert p["gathered"].activations["loss"] == p["sharded"].activations["loss"]


def test_remat_orders_loss_memory():
    cfg = _run_config("data.seq_len=512", "rlp.rollout.thought_len=64")
    p = plan.plan(cfg, plan.device_spec("cpu"), {"data": 1, "fsdp": 1, "tensor": 1})
    assert p.loss_by_remat["full"] < p.loss_by_remat["dots"] < p.loss_by_remat["none"]
    assert p.loss_by_remat["none"] == p.activations["loss"]          # smoke runs remat none


def test_micro_batches_plan_the_activations_of_fewer_rows():
    cfg = _run_config("data.seq_len=512", "rlp.rollout.thought_len=64")
    one = plan.plan(cfg, plan.device_spec("cpu"), {"data": 1, "fsdp": 1, "tensor": 1})
    four = plan.plan(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batches=4)),
                     plan.device_spec("cpu"), {"data": 1, "fsdp": 1, "tensor": 1})
    m = model_config(cfg.model)
    by_rows = lambda r: plan.activation_bytes(m, cfg.rlp, rows=r, seq_len=512, tp=1, objective="rlp")
    assert one.activations == by_rows(8) and four.activations == by_rows(2)   # 8 rows, 4 micro-batches of 2
    assert four.activations["loss"] < one.activations["loss"] / 3
    # the float32 accumulator joins the gradients; FLOPs per step do not change
    assert four.state["gradients"] == one.state["gradients"] + one.state["ema"]
    assert four.rlp_flops == one.rlp_flops and four.micro_batches == 4


def test_hint_names_the_micro_batches_that_fit():
    cfg = load_experiment("web_mix").config()
    p = plan.plan(cfg, plan.device_spec("v5p-64"), {"data": 1, "fsdp": 32, "tensor": 1})
    assert not p.fits and p.rows_per_device == 16
    (hint,) = [h for h in p.hints if "micro_batches=" in h]
    k = int(hint.split("micro_batches=")[1].split()[0])
    fixed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batches=k))
    assert plan.plan(fixed, plan.device_spec("v5p-64"), {"data": 1, "fsdp": 32, "tensor": 1}).fits
    half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batches=k // 2))
    assert not plan.plan(half, plan.device_spec("v5p-64"), {"data": 1, "fsdp": 32, "tensor": 1}).fits


# ---- devices --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,kind,chips", [
    ("v5p-64", "v5p", 32), ("v4-8", "v4", 4), ("v5litepod-16", "v5e", 16), ("v6e-8", "v6e", 8),
    ("h100x8", "h100", 8), ("a100-80gbx4", "a100-80gb", 4), ("h200", "h200", 1), ("v5px4", "v5p", 4),
    ("cpu", "cpu", 1)])
def test_device_spec(text, kind, chips):
    spec = plan.device_spec(text)
    assert (spec.kind, spec.chips) == (kind, chips)


@pytest.mark.parametrize("text", ["v5p-3", "h100-8", "tpu9-8", "cpux0"])
def test_device_spec_rejects(text):
    with pytest.raises(ValueError):
        plan.device_spec(text)


# ---- (4), (5) the command line ---------------------------------------------------------------------

def test_cli_warns_when_it_does_not_fit(monkeypatch, capsys):
    monkeypatch.setattr(plan.devices, "host_ram", lambda: 32.0 * plan.GIB)    # the same verdict on any host
    assert plan.main(["--experiment=smoke", "--set", "model.preset=qwen3-8b", "--devices=cpu"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: does not fit" in out and "hint:" in out
    assert plan.main(["--experiment=smoke", "--devices=cpu"]) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out and "TOTAL" in out and "NTP step" in out


def test_cli_bad_device_is_a_one_line_error():
    r = subprocess.run([sys.executable, "-m", "rlp_jax.plan", "--experiment=smoke", "--devices=tpu9-8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown device kind")
    assert all(kind in lines[0] for kind in plan.DEVICE_KINDS)


@pytest.mark.parametrize("argv", [["--experiment=smoke"], ["--experiment=smoke", "--devices=cpu", "--mfu=x"],
                                  ["--experiment=smoke", "--devices=v5p-8", "--mesh=fsdp=3"],
                                  ["--experiment=nope", "--devices=cpu"]])
def test_cli_bad_flags(argv, capsys):
    try:
        rc = plan.main(argv)
    except SystemExit as e:          # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")


def test_default_mesh_takes_train_mesh_when_it_fits():
    cfg = _run_config()                                   # smoke: mesh data=-1, batch 8
    assert plan.default_mesh(cfg, 4) == {"data": 4, "fsdp": 1, "tensor": 1}
    assert plan.default_mesh(cfg, 16) == {"data": 1, "fsdp": 16, "tensor": 1}   # 8 rows do not split over 16
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mesh=sharding.MeshConfig(data=3)))
    assert plan.default_mesh(cfg, 4) == {"data": 1, "fsdp": 4, "tensor": 1}


def test_model_config_reads_every_kind_of_init_from(tmp_path):
    """The planner's architecture comes from whatever model.init_from names, without its weights: an
    rlp_jax run directory (the NTP stage before RLP), a Hugging Face directory; a wrong path is one line."""
    from rlp_jax.runs.layout import read_run_record
    from tests.hf_models import make_hf_model
    from tests.run_dirs import make_run_dir

    run = make_run_dir(tmp_path / "run")
    got = model_config(ModelSection(init_from=str(run), remat="full"))
    assert got == read_run_record(run).model.replace(remat="full")

    hf_model = make_hf_model("llama")
    hf_model.save_pretrained(tmp_path / "hf")
    got = model_config(ModelSection(init_from=str(tmp_path / "hf"), compute_dtype="bfloat16"))
    assert (got.num_layers, got.hidden_size, got.vocab_size, got.compute_dtype) == (
        hf_model.config.num_hidden_layers, hf_model.config.hidden_size, hf_model.config.vocab_size, "bfloat16")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json there") as e:
        model_config(ModelSection(init_from=str(tmp_path / "empty")))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,chips,sizes", [
    ("fsdp=4", 8, (2, 4, 1)), ("data=2", 8, (2, 4, 1)), ("data=2,fsdp=4", 8, (2, 4, 1)),
    ("tensor=2", 8, (4, 1, 2)), ("data=-1", 8, (8, 1, 1)), ("fsdp=-1,tensor=2", 8, (1, 4, 2)),
])
def test_one_mesh_syntax_for_every_command(text, chips, sizes):
    """`sharding.MeshConfig.parse` is what train --mesh, evaluate --mesh and plan --mesh read."""
    assert sharding.MeshConfig.parse(text).resolve(chips) == sizes
    assert tuple(plan.parse_mesh(text, chips).values()) == sizes


@pytest.mark.parametrize("text", ["fsdp", "fsdp=x", "pipe=2", "data=2,data=4", "data=-1,fsdp=-1", "data=0"])
def test_bad_mesh_text_is_one_line(text):
    with pytest.raises(ValueError, match=r"^--mesh "):
        sharding.MeshConfig.parse(text)


@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_plan_agrees_with_xla_memory_analysis(attention):
    """The planner's per-device total for an RLP step against XLA's own account of the compiled step
    (temporaries + arguments), for dense and blockwise attention at a scaled-down shape."""
    planned, xla = _planned_and_xla_step([
        "model.preset=small", f"model.attention={attention}", "model.attention_block=64", "model.remat=none"])
    assert 0.8 <= planned.total / xla <= 1.2, (planned.total / 2 ** 20, xla / 2 ** 20)


def _planned_and_xla_step(model_overrides):
    """(the planner's `plan` of one RLP step of 256-token documents on one CPU device, XLA's bytes for the compiled
    step: temporaries + arguments), for the smoke recipe with `model_overrides`."""
    from rlp_jax.rlp.objective import Objective
    from rlp_jax.rlp.think_ids import ThinkIds
    from rlp_jax.train import train_step
    from rlp_jax.train.optim import make_optimizer

    cfg = apply_overrides(load_experiment("smoke").config(), [*model_overrides,
        "data.seq_len=256", "data.batch_size=1", "rlp.rollout.positions_per_doc=1", "rlp.rollout.group_size=4",
        "rlp.rollout.thought_len=16", "rlp.loss.ntp_weight=0", "rlp.loss.kl_beta=0"])
    m = model_config(cfg.model)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    layout = train_step.state_layout(m, optimizer, mesh)
    objective = Objective(cfg.rlp, ThinkIds(start=1, end=2))
    step = train_step.make_rlp_train_step(m, objective, optimizer, mesh=mesh, state_shardings=layout.shardings)
    rows = jax.ShapeDtypeStruct((1, 256), jax.numpy.int32)
    batch = {"tokens": rows, "segment_ids": rows, "positions": rows}
    analysis = step.lower(layout.abstract, batch, jax.random.key(0)).compile().memory_analysis()
    xla = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
    return plan.plan(cfg, plan.device_spec("cpux1"), {"data": 1, "fsdp": 1, "tensor": 1}), xla


# ---- Nemotron-H (the hybrid family) ----------------------------------------------------------------

def _hybrid(pattern: str, **fields):
    """A Nemotron-H shape from config.json fields (`hybrid.config_from_hf`), small unless told."""
    from rlp_jax.model.nemotron_h import hybrid

    base = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=32, conv_kernel=4,
                chunk_size=32, tie_word_embeddings=True)
    return hybrid.config_from_hf(base | fields | {"hybrid_override_pattern": pattern})


def _abstract_params(h):
    from rlp_jax.model.nemotron_h import hybrid

    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jax.numpy.float32), hybrid.param_shapes(h),
                        is_leaf=lambda x: isinstance(x, tuple))


def test_hybrid_preset_count_and_sharded_state():
    """The 12B preset's count is the model's own (`hybrid.num_params`, equal to transformers' in
    tests/model/test_hybrid.py); its state is sharded by the hybrid's logical axes."""
    from rlp_jax.model.nemotron_h import hybrid

    cfg = apply_overrides(load_experiment("web_mix").config(), ["model.preset=nemotron-nano-12b-v2"])
    one = plan.plan(cfg, plan.device_spec("h200"), {"data": 1, "fsdp": 1, "tensor": 1})
    assert one.num_params == hybrid.num_params(hybrid.preset("nemotron-nano-12b-v2")) == 12_310_001_152
    assert one.state["params"] == one.state["ema"] == one.state["gradients"] == 4 * 12_310_001_152   # float32
    assert one.state["optimizer"] == 2 * 4 * 12_310_001_152 + 3 * 4          # AdamW mu, nu + three counters
    eight = plan.plan(cfg, plan.device_spec("h200x8"), {"data": 1, "fsdp": 8, "tensor": 1})
    # fsdp splits the model width of every matrix; norms, the Mamba conv (kernel 4 x 12288 + bias), dt_bias /
    # A_log / D (3 x 128) and the gated norm (10240) stay whole: R values replicated
    replicated = 28 * (5 * 12288 + 3 * 128 + 10240) + 63 * 5120
    assert eight.state["params"] == 4 * (12_310_001_152 - replicated) / 8 + 4 * replicated


def test_hybrid_forward_flops_by_hand():
    """One Mamba-2, one attention and one MLP block: V=32, D=8, Mamba H=2 P=4 (I=8) G=1 N=4 K=4 (X=16) chunk 4,
    attention Q=2 E=1 W=4, F=16; one row of L=6 tokens (8 as the chunked scan runs it), one branch position.
    Matmul weights per token: Mamba in_proj 8*(8+16+2) + conv 4*16 + out_proj 8*8 = 336; attention
    q 64 + k 32 + v 32 + o 64 = 192; MLP 2*8*16 = 256: 784 -> 2*784*6 = 9408.
    Scan per padded token 2*4*(1*4 + 8) + 4*8*4 = 224 -> 224*8 = 1792; the state at one position 2*4*8*4 = 256.
    Attention 4*Q*W per causal pair: 4*2*4*21 = 672. Logits 2*D*V per token: 2*8*32*6 = 3072. Total 15200."""
    from rlp_jax.plan import hybrid_costs

    h = _hybrid("M*-", vocab_size=32, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                head_dim=4, mamba_num_heads=2, mamba_head_dim=4, n_groups=1, ssm_state_size=4, chunk_size=4)
    assert hybrid_costs.matmul_weights(h) == 784
    assert hybrid_costs.forward_flops(h, seqs=1, length=6, pairs=21, head_tokens=6, states=1) == 15200


def test_hybrid_forward_flops_match_xla_cost_analysis():
    """Against XLA's own FLOP count of the jitted `hybrid.forward` (its masked attention runs all L x L pairs, so
    the planner is asked for those); XLA also counts elementwise work, hence the 5% window."""
    from rlp_jax.model.nemotron_h import hybrid
    from rlp_jax.plan import hybrid_costs

    h = _hybrid("M-M*-", hidden_size=512, intermediate_size=1024, num_attention_heads=8, head_dim=64,
                mamba_num_heads=16, mamba_head_dim=32)
    b, length = 2, 100
    tokens = jax.ShapeDtypeStruct((b, length), jax.numpy.int32)
    compiled = jax.jit(lambda p, t: hybrid.forward(p, h, t)).lower(_abstract_params(h), tokens).compile()
    ours = hybrid_costs.forward_flops(h, seqs=b, length=length, pairs=b * length * length, head_tokens=b * length)
    assert 0.95 <= ours / compiled.cost_analysis()["flops"] <= 1.05


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_hybrid_branch_state_is_what_the_code_allocates(compute):
    """Per branch: the Mamba states (H P N + (K-1) X float32 values per Mamba block) and keys/values of the
    attention blocks only (compute dtype); per (row, position): the prefix. Checked against the arrays
    `branch` builds for the 12B preset (shapes only, `jax.eval_shape`)."""
    from rlp_jax.model.nemotron_h import branch, hybrid
    from rlp_jax.plan import hybrid_costs

    h = hybrid.preset("nemotron-nano-12b-v2", compute_dtype=compute)
    assert hybrid_costs.mamba_state_bytes(h) == 28 * 4 * (128 * 80 * 128 + 3 * (10240 + 2 * 8 * 128))
    rows, length, positions, thoughts, slots = 2, 64, 3, 4, 16
    _, prefix = jax.eval_shape(lambda p: branch.prefix_forward(
        p, h, jax.numpy.zeros((rows, length), jax.numpy.int32), jax.numpy.ones((rows, positions), jax.numpy.int32)),
        _abstract_params(h))
    cache = jax.eval_shape(lambda pre: branch.init_branch_cache(h, pre, thoughts, slots), prefix)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))   # noqa: E731
    assert nbytes(prefix.blocks) == hybrid_costs.prefix_cache_bytes(h, rows=rows, seq_len=length, positions=positions)
    assert nbytes(cache.blocks) == hybrid_costs.branch_cache_bytes(h, branches=rows * positions * thoughts,
                                                                   slots=slots)


@pytest.mark.parametrize("pattern, attention, block", [("M-M*-M-", "auto", 512), ("M*-*-", "blockwise", 8),
                                                       ("M*-*-", "auto", 64)])
@pytest.mark.parametrize("shape", ["documents", "branches"])
def test_hybrid_passes_agree_with_xla_memory_analysis(shape, pattern, attention, block):
    """The planner's bytes for the differentiable passes the hybrid's loss is made of, + params + gradients,
    against XLA's account (temporaries + arguments + outputs) of jax.grad of: documents: `hybrid.forward`;
    branches: `branch.prefix_forward` then `branch_forward` of G thoughts at K positions per row. Each
    loss reads its logits through a log-softmax: logits, log-probabilities and their cotangent, 3 float32 arrays
    of V per scored token. Attention: dense (every key set within one 512-key block), blockwise (8-key blocks),
    or mixed (64-key blocks: the documents' keys blockwise, a thought's own 40 keys dense); the blockwise cases
    with two attention blocks of three, where counting their pairs as dense would put the planner ~25% over."""
    from rlp_jax.model.nemotron_h import branch, hybrid
    from rlp_jax.plan import hybrid_costs

    h = _hybrid(pattern).replace(attention=attention, attention_block=block)
    rows, length, k, g, t = (2, 256, 0, 0, 0) if shape == "documents" else (1, 256, 2, 4, 40)
    tokens = jax.ShapeDtypeStruct((rows, length), jax.numpy.int32)
    score = lambda logits, ids: jax.numpy.sum(jax.numpy.take_along_axis(   # noqa: E731
        jax.nn.log_softmax(logits), ids[..., None], -1))
    if shape == "documents":
        loss, args, scored = lambda p, x: score(hybrid.forward(p, h, x), x), (_abstract_params(h), tokens), rows * length
    else:
        def loss(p, x, t_bk, th):
            _, prefix = branch.prefix_forward(p, h, x, t_bk)
            return score(branch.branch_forward(p, h, prefix, th), th)
        args = (_abstract_params(h), tokens, jax.ShapeDtypeStruct((rows, k), jax.numpy.int32),
                jax.ShapeDtypeStruct((rows, k, g, t), jax.numpy.int32))
        scored = rows * k * g * t
    analysis = jax.jit(jax.grad(loss)).lower(*args).compile().memory_analysis()
    xla = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
    planned = (2 * 4 * h.num_params() + 3 * 4 * scored * h.vocab_size
               + hybrid_costs.loss_pass_bytes(h, rows=rows, seq_len=length, positions=k, branches=k * g, branch_len=t))
    assert 0.8 <= planned / xla <= 1.2, (planned / 2 ** 20, xla / 2 ** 20)


@pytest.mark.parametrize("compute, attention", [("float32", "dense"), ("bfloat16", "dense"), ("float32", "blockwise")])
def test_hybrid_plan_agrees_with_xla_memory_analysis(compute, attention):
    """The planner's per-device total for a Nemotron-H RLP step against XLA's account of the compiled step, as
    test_plan_agrees_with_xla_memory_analysis does for the dense family (remat none: XLA:CPU keeps the same
    buffers with a per-block jax.checkpoint in an unrolled block loop, so remat full/dots are not checkable here).
    Attention dense or blockwise in 8-key blocks (documents, the thoughts' forward and sampling)."""
    planned, xla = _planned_and_xla_step([
        "model.preset=nemotron-h-tiny", "model.remat=none", f"model.compute_dtype={compute}",
        f"model.attention={attention}", "model.attention_block=8"])
    assert planned.activations["loss"] > 5 * planned.state["params"]      # the activations are what is checked
    assert 0.8 <= planned.total / xla <= 1.2, (planned.total / 2 ** 20, xla / 2 ** 20)


def test_cli_plans_the_12b_hybrid(capsys):
    from rlp_jax.plan import hybrid_costs

    argv = ["--experiment=web_mix", "--set", "model.preset=nemotron-nano-12b-v2", "--devices=h100x64"]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "(12,310,001,152)" in out and "Nemotron-H, 28 Mamba-2 + 6 attention + 28 MLP blocks" in out
    cfg = apply_overrides(load_experiment("web_mix").config(), ["model.preset=nemotron-nano-12b-v2"])
    total = sum(hybrid_costs.rlp_step_flops(model_config(cfg.model), cfg.rlp, 512, 2048).values())
    (line,) = [x for x in out.splitlines() if x.strip().startswith("RLP step")]
    assert line.split()[-1] == f"{total / 1e15:.3g}P"


@pytest.mark.parametrize("compute, per_token", [("float32", 23040), ("bfloat16", 22016)])
def test_hybrid_mamba_block_keeps_xla_tpus_saved_set_on_tpu(compute, per_token):
    """What one Mamba block more keeps under remat none on a TPU target, by hand for a shape that fills the tiles
    (D 256, 4 heads of 64: I 256, X 512, one group, N 128, chunks of 128; 2 rows of 512 tokens):
    c 2 D + 4 (D + 3 I + 6 X + (H + 3 G) C + I N / C) bytes per token = c 512 + 4 (256 + 768 + 3072 + 896 + 256).
    XLA:TPU's own figures for this shape (the fit's data: jax.grad of `hybrid.forward`, one v5p chip): 23044 and
    22020. On CPUs the planner keeps XLA:CPU's larger set."""
    from rlp_jax.plan import hybrid_costs
    from rlp_jax.plan.costs import DENSE, TPU_TILING

    shape = dict(hidden_size=256, mamba_num_heads=4, mamba_head_dim=64, n_groups=1, ssm_state_size=128,
                 chunk_size=128)
    def pass_bytes(pattern, tiling):
        h = _hybrid(pattern, **shape).replace(remat="none", compute_dtype=compute)
        return hybrid_costs.loss_pass_bytes(h, rows=2, seq_len=512, positions=0, branches=0, branch_len=0,
                                            tiling=tiling)
    assert pass_bytes("MM", TPU_TILING) - pass_bytes("M", TPU_TILING) == 2 * 512 * per_token
    assert pass_bytes("MM", DENSE) - pass_bytes("M", DENSE) > 1.6 * 2 * 512 * per_token


def test_tpu_tiling_pads_the_two_minor_dimensions():
    """(8, 128) tiles, as XLA:TPU laid the bar config's arrays (bfloat16 too: `T(8,128)(2,1)`): rows pad to 8 (to
    a power of two when fewer), columns to 128; dense = 1."""
    from rlp_jax.plan.costs import DENSE, TPU_TILING

    assert TPU_TILING.factor(34, 546, 4) == pytest.approx(40 * 640 / (34 * 546))   # f32[.., 34, 546] scores: 400 MiB
    assert TPU_TILING.factor(34, 512, 2) == pytest.approx(40 / 34)                  # bf16[.., 34, 512]: 160 MiB
    assert TPU_TILING.factor(32, 34, 2) == pytest.approx(128 / 34)     # a branch's per-head [head_dim, tokens]
    assert TPU_TILING.factor(2, 16, 2) == pytest.approx(128 / 16)      # two rows: a (2, 128) tile
    assert TPU_TILING.factor(512, 512, 4) == 1.0 and DENSE.factor(34, 546, 4) == 1.0 == DENSE.factor(33, 7, 2)
    cfg = apply_overrides(load_experiment("demo").config(), ["model.preset=small", "data.seq_len=512",
                                                             "data.batch_size=16", "model.compute_dtype=bfloat16"])
    mesh = {"data": 4, "fsdp": 1, "tensor": 1}
    tpu = plan.plan(cfg, plan.device_spec("v5p-8"), mesh)
    dense = plan.plan(cfg, plan.device_spec("h100x4"), mesh)
    assert tpu.activations["loss"] > 1.3 * dense.activations["loss"]   # 34-token branches, head width 32
    assert tpu.state == dense.state
