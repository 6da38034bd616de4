"""Nemotron-H (hybrid Mamba-2 / attention): our logits and Mamba-2 mixer equal transformers'; the recurrent
step equals the chunked scan; states read at positions equal the states stepping reaches."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.model import mamba2
from rlp_jax.model.nemotron_h import hybrid
from tests.hf_models import NEMOTRON_H_BLOCKS, tiny_nemotron_h

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BLOCKS = list(NEMOTRON_H_BLOCKS)
L = 21            # not a multiple of the chunk size 8: a partial last chunk


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    ref = tiny_nemotron_h()
    path = tmp_path_factory.mktemp("nemotron_h")
    ref.save_pretrained(path)
    cfg, params = hybrid.from_hf(path)
    return ref, cfg, params, path


def _batch(vocab, seed=0):
    """Tokens [3, L] and their mask: a full row, a right-padded row (13 real) and a left-padded row (6 pads)."""
    tokens = np.random.RandomState(seed).randint(0, vocab, size=(3, L)).astype(np.int32)
    mask = np.ones((3, L), np.int32)
    mask[1, 13:] = 0
    mask[2, :6] = 0
    return tokens, mask


def _rel_err(ours, ref, mask):
    sel = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(ours)[sel] - ref[sel]).max() / np.abs(ref[sel]).max())


def test_logits_match_transformers(loaded):
    ref, cfg, params, _ = loaded
    assert cfg.block_types == tuple(BLOCKS) and cfg.mamba.chunk_size == 8
    assert all(type(leaf) is np.ndarray for leaf in jax.tree.leaves(params))
    tokens, mask = _batch(cfg.vocab_size)
    with torch.no_grad():
        want = ref(torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits.numpy()
    ours = jax.jit(hybrid.forward, static_argnums=1)(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    assert ours.dtype == jnp.float32 and ours.shape == (3, L, cfg.vocab_size)
    err = _rel_err(ours, want, mask)
    print(f"logits max relative error {err:.2e}")
    assert err <= 1e-4
    # the full-length row alone, no mask: the same logits
    alone = hybrid.forward(params, cfg, jnp.asarray(tokens[:1]))
    assert _rel_err(alone, want[:1], mask[:1]) <= 1e-4


def test_mamba_mixer_matches_transformers(loaded):
    """The mixer alone on rows full, right-padded and left-padded, compared at every position (transformers
    zeroes padded positions' inputs and conv outputs; left padding shows whether that reaches the state)."""
    ref, cfg, params, _ = loaded
    x = np.random.RandomState(1).randn(3, L, cfg.hidden_size).astype(np.float32)
    _, mask = _batch(cfg.vocab_size)
    with torch.no_grad():
        want = ref.model.layers[0].mixer(torch.as_tensor(x), attention_mask=torch.as_tensor(mask)).numpy()
    ours, _ = mamba2.mamba2_forward(params["blocks"][0]["mixer"], cfg.mamba, jnp.asarray(x), jnp.asarray(mask))
    err = _rel_err(ours, want, np.ones_like(mask))
    print(f"mamba mixer max relative error {err:.2e}")
    assert err <= 1e-5
    unmasked, _ = mamba2.mamba2_forward(params["blocks"][0]["mixer"], cfg.mamba, jnp.asarray(x))
    assert _rel_err(unmasked[2:], want[2:], mask[2:]) > 1e-3      # the left padding does matter


def _step_through(p, mcfg, x_bld):
    """Outputs [B, L, D] and the states before each token and after the last (L+1 of them), by mamba2_step."""
    step = jax.jit(mamba2.mamba2_step, static_argnums=1)
    state, outs, states = mamba2.init_state(mcfg, x_bld.shape[0]), [], []
    for i in range(x_bld.shape[1]):
        states.append(state)
        y, state = step(p, mcfg, x_bld[:, i], state)
        outs.append(y)
    states.append(state)
    return jnp.stack(outs, axis=1), states


def test_recurrent_step_equals_chunked_forward_and_states_at_positions(loaded):
    _, cfg, params, _ = loaded
    p, mcfg = params["blocks"][3]["mixer"], cfg.mamba
    x = jnp.asarray(np.random.RandomState(2).randn(2, L, cfg.hidden_size).astype(np.float32))
    positions = jnp.asarray([[0, 1, 7, 8, 9, 16, 20, 21], [21, 3, 8, 15, 16, 17, 2, 0]], jnp.int32)
    full, at = jax.jit(lambda a, b: mamba2.mamba2_forward(p, mcfg, a, positions_bm=b))(x, positions)
    stepped, states = _step_through(p, mcfg, x)
    err = float(jnp.abs(stepped - full).max())
    print(f"step vs chunked forward max abs error {err:.2e}")
    assert err <= 1e-5
    ssm_err = conv_err = 0.0
    for row in range(2):
        for m, t in enumerate(np.asarray(positions[row])):
            want = states[t]
            ssm_err = max(ssm_err, float(jnp.abs(at.ssm[row, m] - want.ssm[row]).max()))
            conv_err = max(conv_err, float(jnp.abs(at.conv[row, m] - want.conv[row]).max()))
    print(f"state at positions max abs error: ssm {ssm_err:.2e}, conv {conv_err:.2e}")
    assert ssm_err <= 1e-5 and conv_err == 0.0
    # continuing from a state read at t equals the uninterrupted forward from t on (a branch at t)
    t = 11
    _, split = mamba2.mamba2_forward(p, mcfg, x[:, :t], positions_bm=jnp.full((2, 1), t))
    start = jax.tree.map(lambda a: a[:, 0], split)
    rest, _ = mamba2.mamba2_forward(p, mcfg, x[:, t:], state=start)
    assert float(jnp.abs(rest - full[:, t:]).max()) <= 1e-5
    first, _ = mamba2.mamba2_step(p, mcfg, x[:, t], start)
    assert float(jnp.abs(first - full[:, t]).max()) <= 1e-5


def test_unsupported_configs_say_what_to_do(loaded, tmp_path):
    _, _, _, path = loaded
    base = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match="MoE variants .* not supported"):
        hybrid.config_from_hf(base | {"layers_block_type": ["linear_attention", "moe"]})
    with pytest.raises(ValueError, match="unsupported Nemotron-H block types"):
        hybrid.config_from_hf(base | {"layers_block_type": ["sliding_attention"]})
    legacy = {k: v for k, v in base.items() if k != "layers_block_type"} | {"hybrid_override_pattern": "M*-M-"}
    assert hybrid.config_from_hf(legacy) == hybrid.config_from_hf(base)
    (tmp_path / "config.json").write_text(json.dumps(base | {"layers_block_type": BLOCKS + ["mlp"]}))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor '(model|backbone)\.layers\.5\.norm\.weight'"):
        hybrid.from_hf(tmp_path)


def test_nemotron_nano_12b_preset_has_transformers_parameter_count():
    """The paper's hybrid model's public shape: our count equals transformers' for the same config (built
    on the meta device: no memory), and the block mix is 28 Mamba-2, 28 MLP, 6 attention."""
    import torch
    import transformers

    cfg = hybrid.preset("nemotron-nano-12b-v2")
    assert [cfg.block_types.count(k) for k in hybrid.BLOCK_TYPES] == [28, 6, 28]
    fields = {k: v for k, v in hybrid.PRESETS["nemotron-nano-12b-v2"].items() if k != "hybrid_override_pattern"}
    hf_cfg = transformers.NemotronHConfig(**fields, layers_block_type=list(cfg.block_types))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.NemotronHForCausalLM(hf_cfg).parameters())
    assert hybrid.num_params(cfg) == theirs
    assert 12.0e9 < theirs < 12.6e9


def test_packed_documents_equal_each_document_alone(loaded):
    """Segment ids: every packed document reads from a zero state (conv and SSM reset where the id changes; chunk 8,
    so the resets fall inside chunks and a document spans a chunk boundary) and attends only to itself. Its logits,
    and the Mamba states after x_<t read at positions t inside it, equal the document run alone; at a document's
    first token the state is empty."""
    ref, cfg, params, _ = loaded
    lens = (7, 9, 3)                                      # then 2 pads: 21 = L
    seg = np.repeat(np.arange(1, 4), lens)
    seg = np.concatenate([seg, np.zeros(L - seg.size, int)]).astype(np.int32)[None]
    tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, size=(1, L)).astype(np.int32)
    starts = np.cumsum((0,) + lens)
    t_bm = jnp.asarray([[9, 12, 16, 7, 19]], jnp.int32)   # inside doc 2 (x2), doc 3's and doc 2's first tokens, L-2
    packed, caches = hybrid.run_blocks(params, cfg, tokens, seg, positions_bm=t_bm)
    logits = hybrid.logits_from_hidden(params, cfg, packed)[0]
    for d, n in enumerate(lens):
        doc = tokens[:, starts[d]:starts[d] + n]
        alone = hybrid.forward(params, cfg, doc)[0]
        with torch.no_grad():
            theirs = ref(torch.as_tensor(doc, dtype=torch.long)).logits.numpy()[0]
        np.testing.assert_allclose(logits[starts[d]:starts[d] + n], alone, atol=1e-5 * float(np.abs(alone).max()))
        assert _rel_err(logits[starts[d]:starts[d] + n], theirs, np.ones(n)) <= 1e-4
    doc2 = tokens[:, starts[1]:starts[2]]
    _, alone = hybrid.run_blocks(params, cfg, doc2, np.ones_like(doc2), positions_bm=jnp.asarray([[2, 5]]))
    doc3 = tokens[:, starts[2]:starts[3]]
    _, end3 = hybrid.run_blocks(params, cfg, doc3, np.ones_like(doc3), positions_bm=jnp.asarray([[3]]))
    mambas = [i for i, kind in enumerate(cfg.block_types) if kind == hybrid.MAMBA]
    for i in mambas:
        for got, want in ((caches[i].ssm[0, :2], alone[i].ssm[0]), (caches[i].conv[0, :2], alone[i].conv[0]),
                          (caches[i].ssm[0, 4], end3[i].ssm[0, 0]), (caches[i].conv[0, 4], end3[i].conv[0, 0])):
            np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, float(np.abs(want).max())))
        assert float(jnp.abs(caches[i].ssm[0, 2:4]).max()) == 0.0 and float(jnp.abs(caches[i].conv[0, 2:4]).max()) == 0.0


def test_left_padding_with_mamba_biases_matches_transformers(tmp_path):
    """With in_proj biases a padded position's conv input is the bias (its hidden input is zeroed); transformers'
    conv reads it at a left-padded row's first real tokens, and so must ours."""
    ref = tiny_nemotron_h(seed=6, use_bias=True)
    ref.save_pretrained(tmp_path)
    cfg, params = hybrid.from_hf(tmp_path)
    assert cfg.use_bias
    tokens, mask = _batch(cfg.vocab_size, seed=2)
    with torch.no_grad():
        want = ref(torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits.numpy()
    assert _rel_err(hybrid.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)), want, mask) <= 1e-4
