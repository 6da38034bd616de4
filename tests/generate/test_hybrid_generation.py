"""Generation from prompts with a Nemotron-H hybrid (`rlp_jax.model.family.prefill` / `decode_step`: one branch
off each prompt's end): greedy tokens and their log-probs equal re-running the whole sequence through
`hybrid.forward` after every token, for right-padded prompts of different lengths."""

import jax
import numpy as np

from rlp_jax.generate.generation import SamplingConfig, generate
from rlp_jax.model.nemotron_h import hybrid

J = 6


def test_greedy_generation_equals_rerunning_the_full_forward():
    cfg = hybrid.preset("nemotron-h-tiny")
    params = hybrid.init_params(cfg, jax.random.key(0), std=0.3)
    lens = np.array([11, 5], np.int32)                     # chunk 16: both prompts end inside the first chunk
    prompts = np.array(jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size), np.int32)
    prompts[np.arange(12)[None] >= lens[:, None]] = 0
    sc = SamplingConfig(max_new_tokens=J, temperature=0.0)
    got = jax.jit(generate, static_argnums=(1, 5))(params, cfg, prompts, lens, jax.random.key(2), sc)
    fwd = jax.jit(hybrid.forward, static_argnums=1)
    for row in range(2):
        seq = list(prompts[row, :lens[row]])
        for i in range(J):
            logits = np.asarray(fwd(params, cfg, np.asarray([seq], np.int32)))[0, -1]
            want = int(np.argmax(logits))
            assert int(got.tokens[row, i]) == want, (row, i)
            np.testing.assert_allclose(got.logprobs[row, i], jax.nn.log_softmax(logits)[want], atol=1e-5)
            seq.append(want)
    assert len({tuple(np.asarray(t)) for t in got.tokens}) == 2 and int(got.lengths.min()) == J
