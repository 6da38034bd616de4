"""An lm-evaluation-harness model over rlp_jax: `RlpJaxLM`, registered with lm-eval as `rlp_jax`.

    python -m rlp_jax.lm_eval --model_args checkpoint=RUN_DIR[,which=ema,step=N,think=true] --tasks hellaswag

or from Python, after importing this module, `lm_eval.simple_evaluate(model="rlp_jax", model_args=...)` (or
`model=RlpJaxLM(...)`). The checkpoint is a run directory, a Hugging Face folder, a `.gguf` file or a model
name (`rlp_jax.runs.loading.load_model`); nothing is exported first.

Requests are scored as lm-eval's `hf` backend scores them, so numbers compare with anyone's:
- loglikelihood: context and continuation encoded together and split (lm-eval's `TemplateLM`), an empty
  context replaced by the prefix token (bos, else eos), inputs left-truncated to `max_length + 1`;
  returns (sum of the continuation's float32 log-probs, whether every continuation token is the argmax).
- loglikelihood_rolling: lm-eval's disjoint rolling windows of `max_length` tokens, summed.
- generate_until: the context left-truncated to `max_length - max_gen_toks`, decoded greedily (or sampled
  when the task asks), cut at the first stop string; with `think=true` a thought is sampled between the
  think markers first, at the end of the context, as `rlp_jax.evaluate` does in its think mode.
Token ids are our tokenizer's (the one the run trained with, think markers included), which encodes as the
export's Hugging Face tokenizer does (`tests/test_export.py`). Batches run jit-compiled over the device
mesh (`rlp_jax.evaluate.decoder.Decoder`). Single process: lm-eval's own data-parallel ranks are not used.
"""

from __future__ import annotations

import jax
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from rlp_jax import sharding
from rlp_jax.evaluate.decoder import DecodeOptions, Decoder
from rlp_jax.generate.generation import SamplingConfig
from rlp_jax.runs.loading import LoadedModel, load_model

DEFAULT_MAX_LENGTH = 2048   # lm-eval's `hf` default when the checkpoint declares no context length
DEFAULT_BATCH_SIZE = 16


@register_model("rlp_jax")
class RlpJaxLM(TemplateLM):
    """lm-eval model args (all optional but `checkpoint`):
      checkpoint: run directory, Hugging Face folder, .gguf file or model name.
      which: "params" or "ema" (run directories). step: checkpoint step (default: the latest).
      think: sample a thought before each generation (generate_until only). think_tokens: its budget.
      max_length: context length (default: the checkpoint's max_position_embeddings, else 2048).
      max_gen_toks: default generation budget (256, as lm-eval's). add_bos_token: prepend bos when encoding.
      batch_size: sequences per compiled batch ("auto" = 16). mesh: e.g. "data=2;fsdp=4" (default: data=-1).
      compute_dtype: override the checkpoint's compute dtype. seed: sampling seed.
    `lm`: an already loaded `LoadedModel` instead of `checkpoint` (Python use).
    """

    def __init__(self, checkpoint: str | None = None, *, lm: LoadedModel | None = None, which: str = "params",
                 step: int | None = None, think: bool = False, think_tokens: int = 32, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool = False, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 mesh: str | None = None, compute_dtype: str | None = None, seed: int = 0, **_ignored):
        super().__init__()
        if (checkpoint is None) == (lm is None):
            raise ValueError("give the rlp_jax model checkpoint=PATH (a run dir, HF folder or .gguf file) or lm=")
        if which not in ("params", "ema"):
            raise ValueError(f"which must be params or ema, got {which!r}")
        # lm-eval splits `key=val,...` model args on commas: a mesh there is written `data=2;fsdp=4` (or given
        # in lm-eval's JSON form of --model_args).
        mesh_cfg = sharding.MeshConfig.parse(str(mesh).replace(";", ",")) if mesh else sharding.MeshConfig(data=-1)
        device_mesh = sharding.make_mesh(mesh_cfg)
        self.lm = lm if lm is not None else load_model(str(checkpoint), step=step, which=which, mesh=device_mesh,
                                                       compute_dtype=compute_dtype)
        self.tok = self.lm.tokenizer
        self.batch_size = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        self.decoder = Decoder(self.lm.params, self.lm.cfg, self.tok, mesh=device_mesh, batch_size=self.batch_size)
        self.think, self.think_tokens, self.add_bos_token = bool(think), int(think_tokens), bool(add_bos_token)
        self._max_length = int(max_length or self.lm.cfg.max_position_embeddings or DEFAULT_MAX_LENGTH)
        self.max_gen_toks, self.rng = int(max_gen_toks), jax.random.key(seed)

    # -- what TemplateLM needs --

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tok, "path", type(self.tok).__name__)).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens and self.add_bos_token
        if bos and self.tok.bos_id is not None and string.startswith(self.tok.decode([self.tok.bos_id])):
            bos = False   # the string carries its bos already
        return self.tok.encode(string, add_bos=bos and self.tok.bos_id is not None)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids). Longest first, so that a batch
        holds sequences of similar length (one compiled shape per 64-token bucket)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        prefixes, conts = [], []
        for i in order:
            _, ctx, cont = requests[i]
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            prefixes.append(whole[: len(whole) - len(cont)])
            conts.append(whole[len(whole) - len(cont):])
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        step = self.decoder._bs()
        for s in tqdm(range(0, len(order), step), desc="rlp_jax loglikelihood", disable=disable_tqdm):
            scores = self.decoder.token_scores(prefixes[s:s + step], conts[s:s + step])
            for i, (lp, greedy) in zip(order[s:s + step], scores):
                out[i] = (float(lp.astype("float64").sum()), bool(greedy.all()))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, (string,) in enumerate(r.args for r in requests):
            for w in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += ll
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation kwargs; each group decoded in batches."""
        eos = self.tok.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for n, idx in enumerate(tqdm(groups.values(), desc="rlp_jax generate_until", disable=disable_tqdm)):
            kw = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            budget = int(kw.pop("max_gen_toks"))
            if budget >= self.max_length:
                raise ValueError(f"max_gen_toks={budget} must be below the model's max_length={self.max_length}")
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - budget):] or [self.prefix_token_id]
                       for i in idx]
            key = jax.random.fold_in(self.rng, n)
            if self.think:
                opts = DecodeOptions(think_tokens=self.think_tokens, think_temperature=self.lm.think_temperature,
                                     think_banned_ids=self.lm.think_ids.banned)
                thoughts = self.decoder.think(prompts, opts, jax.random.fold_in(key, 1))
                prompts = [self.decoder.with_thought(p, t) for p, t in zip(prompts, thoughts)]
            sc = SamplingConfig(max_new_tokens=budget, temperature=temperature, top_k=int(kw.get("top_k") or 0),
                                top_p=float(kw.get("top_p") or 1.0),
                                stop_ids=(self.eot_token_id,) if self.eot_token_id is not None else ())
            for i, ids in zip(idx, self.decoder.sample(prompts, sc, key)):
                text = postprocess_generated_text(self.tok.decode(ids, skip_special=True), stop=until,
                                                  think_end_token=None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
