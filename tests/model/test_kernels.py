"""The accelerator-kernel switch (`model.attention="kernel"`, rlp_jax.model.kernels) against the dense
reference: Pallas splash attention run in Pallas's interpreter (the TPU kernel's own code, on CPU), and
the model's kernel path here (jax.nn.dot_product_attention, XLA), outputs and gradients; a prompt
context and branch attention fall back to the pure-JAX path."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model import kernels
from rlp_jax.model.dense import transformer
from rlp_jax.rlp.rollout import thought_rollout
from tests.model.kernel_cases import A, B, E, L, W, attention_case, dense_attention  # noqa: F401
from tests.rlp_cases import (  # noqa: F401
    CFG,
    IDS,
    assert_grads_close,
    batch,
    objective,
    params,
    rlp_config,
)


@pytest.mark.parametrize("on", ["tpu", "cpu"])
def test_kernel_attention_equals_dense(on):
    """on="tpu": the splash kernel in interpret mode; "cpu": jax.nn.dot_product_attention (XLA). Padding
    queries are not compared (their outputs are never read) and carry no cotangent."""
    q, k, v, seg, ct = attention_case()
    ct = ct * (seg > 0)[:, :, None, None]
    kern = lambda q, k, v: kernels.full_attention(q, k, v, seg, A, on=on, interpret=True)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(kern(q, k, v))[real], np.asarray(dense_attention(q, k, v, seg))[real], atol=1e-5)
    grad = lambda f: jax.grad(lambda *a: (f(*a) * ct).sum(), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grad(kern), grad(lambda q, k, v: dense_attention(q, k, v, seg))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_kernel_refusals_name_the_reason():
    assert kernels.supported(128, jnp.float32, on="tpu") is None
    assert "multiple of 128" in kernels.supported(100, jnp.float32, on="tpu")
    assert "bfloat16" in kernels.supported(128, jnp.float32, on="gpu")
    assert kernels.supported(128, jnp.bfloat16, on="gpu") is None


def test_model_with_kernel_attention_equals_dense(params, batch):  # noqa: F811
    """The model's forward and gradients through the kernel switch; with a prompt context the forward
    falls back to the pure-JAX path and still equals dense."""
    dense, kernel = CFG.replace(attention="dense"), CFG.replace(attention="kernel")
    context = transformer.context_cache(params, dense, jnp.asarray([5, 6, 7]))

    def loss(p, cfg, ctx):
        logits, _ = transformer.forward(p, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                                  positions_bl=batch["positions"], context=ctx)
        lp = jax.nn.log_softmax(logits[:, :-1], -1)
        return -jnp.take_along_axis(lp, batch["tokens"][:, 1:, None], -1).mean(), logits

    for ctx in (None, context):
        (l_d, logits_d), g_d = jax.value_and_grad(loss, has_aux=True)(params, dense, ctx)
        (l_k, logits_k), g_k = jax.value_and_grad(loss, has_aux=True)(params, kernel, ctx)
        np.testing.assert_allclose(logits_k, logits_d, atol=1e-5, rtol=1e-5)
        assert_grads_close(g_k, g_d)


def test_rlp_step_with_kernel_attention_equals_dense(params, batch):  # noqa: F811
    """The prefix pass runs through the kernel; the same thoughts, rewards, loss and gradients as dense."""
    rlp = rlp_config(horizon=2, ntp_weight=0.3)
    t_bk = jnp.array([[3, 9], [4, 10]])
    ema_lp = jax.random.normal(jax.random.key(7), batch["tokens"].shape) - 3.0
    out = {}
    for name in ("dense", "kernel"):
        cfg = CFG.replace(attention=name)
        _, prefix = transformer.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                                  positions_bl=batch["positions"], return_cache=True)
        thoughts = thought_rollout(params, cfg, prefix, t_bk, jax.random.key(5), rlp.rollout, IDS)
        step, grads = objective(params, batch, rlp, thoughts, t_bk, ema_lp, cfg=cfg)
        out[name] = thoughts.tokens, step.rewards, step.loss, grads
    np.testing.assert_array_equal(out["kernel"][0], out["dense"][0])
    np.testing.assert_allclose(out["kernel"][1], out["dense"][1], atol=1e-5)
    np.testing.assert_allclose(out["kernel"][2], out["dense"][2], atol=1e-5)
    assert float(jnp.abs(out["dense"][2])) > 0.1
    assert_grads_close(out["kernel"][3], out["dense"][3])


def test_splash_under_a_mesh_equals_dense():
    """With a (data 2, tensor 2) mesh the splash kernel runs per device under shard_map (rows on data, key/value
    heads on tensor): a subprocess with 4 CPU devices checks outputs, their sharding and gradients."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "tests.model.kernel_worker"], cwd=root, env=env, text=True,
                         capture_output=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_equals_dense_on_a_gpu():
    """bf16 cuDNN against the float32 dense reference (bf16 rounding: 3e-2)."""
    q, k, v, seg, _ = attention_case()
    bf = lambda x: x.astype(jnp.bfloat16)
    got = kernels.full_attention(bf(q), bf(k), bf(v), seg, A, on="gpu").astype(jnp.float32)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(dense_attention(q, k, v, seg))[real], atol=3e-2)
