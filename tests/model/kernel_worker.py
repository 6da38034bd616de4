"""Run by tests/model/test_kernels.py with 4 CPU devices: splash attention (Pallas interpreter) under
jit over a (data 2, tensor 2) mesh, through its shard_map, against the dense reference."""

import os

from tests.xla_env import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(devices=4)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlp_jax import sharding  # noqa: E402
from rlp_jax.model import kernels  # noqa: E402
from tests.model.kernel_cases import A, L, attention_case, dense_attention  # noqa: E402


def main():
    q, k, v, seg, ct = attention_case()
    ct = ct * (seg > 0)[:, :, None, None]
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, tensor=2))
    # without the step's mesh, splash is refused on several devices (XLA cannot partition it); with it, allowed
    assert "mesh" in kernels.supported(L, jnp.float32, on="tpu")
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert kernels.supported(L, jnp.float32, on="tpu") is None

    def splash(q, k, v, seg):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return kernels.full_attention(q, k, v, seg, A, on="tpu", interpret=True)

    put = lambda x, names: jax.device_put(x, jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(names, x.shape, mesh)))
    args = (put(q, ("batch", None, "heads", None)), put(k, ("batch", None, "kv_heads", None)),
            put(v, ("batch", None, "kv_heads", None)), put(seg, ("batch", None)))
    out = jax.jit(splash)(*args)
    assert out.sharding.spec == jax.sharding.PartitionSpec("data", None, "tensor", None), out.sharding
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(dense_attention(q, k, v, seg))[real], atol=1e-5)
    got = jax.jit(jax.grad(lambda *a: (splash(*a) * ct).sum(), argnums=(0, 1, 2)))(*args)
    want = jax.grad(lambda q, k, v: (dense_attention(q, k, v, seg) * ct).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
    print("ok")


if __name__ == "__main__":
    main()
