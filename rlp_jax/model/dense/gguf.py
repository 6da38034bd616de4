"""GGUF checkpoints (llama.cpp's single-file format) in: `from_gguf` and `gguf_tokenizer`.

A `.gguf` file holds the model's hyper-parameters and tokenizer as metadata and its tensors, often
block-quantized (Q8_0, Q4_1, Q4_K, ...). `from_gguf` reads a Llama / Qwen2 / Qwen3 file with the `gguf`
package (pure numpy: no torch, no llama.cpp), dequantizes every tensor to float32 and maps it into our
params pytree; `gguf_tokenizer` rebuilds the byte-level BPE tokenizer the file describes (tokens,
merges, token types, special ids, the pre-tokenizer named by `tokenizer.ggml.pre`) as a `tokenizers`
fast tokenizer. Tests check both against transformers' own GGUF loader on small files they write.

Two things llama.cpp's converter does to a Hugging Face checkpoint are undone here:
  * names: `blk.{i}.attn_q.weight` for `model.layers.{i}.self_attn.q_proj.weight` (`_GGUF_NAMES`);
  * for the `llama` architecture only, the rows of attn_q / attn_k are permuted per head from
    Hugging Face's rotate-half layout to interleaved pairs (`_unpermute_rows`). Qwen2 / Qwen3 files
    keep Hugging Face's layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rlp_jax.model.dense.config import ModelConfig
from rlp_jax.model.dense.hf import leaf_reader
from rlp_jax.model.safetensors_io import CheckpointError

ARCHITECTURES = ("llama", "qwen2", "qwen3")

# Hugging Face tensor name (per layer without the "model.layers.{i}." prefix) -> GGUF name.
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}

# `tokenizer.ggml.pre` -> (split regex or None, ByteLevel's own GPT-2 regex on, digits one by one),
# as llama.cpp's llama-vocab.cpp splits text for each pre-tokenizer type.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TOKENIZERS = {
    "default": (None, True, False), "gpt2": (None, True, False),
    "smollm": (None, True, True), "starcoder": (None, True, True),
    "qwen2": (_QWEN2_SPLIT, False, False), "deepseek-r1-qwen": (_QWEN2_SPLIT, False, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, False), "llama3": (_LLAMA3_SPLIT, False, False),
}
_CONTROL, _USER_DEFINED = 3, 4   # llama.cpp token types


def is_gguf(path) -> bool:
    """True if `path` names a local `.gguf` file (by suffix; the contents are checked on reading)."""
    return str(path).endswith(".gguf") and Path(path).is_file()


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` over the file (memory-mapped), or a one-line CheckpointError."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no GGUF file at {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{p} is not a GGUF file (it does not start with the GGUF magic); pass a .gguf "
                              "file written by llama.cpp's converter or the gguf package")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:   # truncated or corrupt files fail in numpy's memmap / struct parsing
        raise CheckpointError(f"cannot read GGUF file {p} ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                              "it is truncated or corrupt: download it again") from None


def metadata(reader, key: str, default=None):
    """One metadata value (str, number, or list for arrays) of an open GGUF file."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, **overrides) -> ModelConfig:
    """ModelConfig from a GGUF file's `general.architecture` and `<arch>.*` metadata."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or metadata(reader, f"{arch}.rope.scaling.type", "none") not in ("none",):
        raise CheckpointError("this GGUF file uses rotary scaling (rope_freqs / rope.scaling), which the GGUF "
                              "loader does not read yet; load the model's Hugging Face checkpoint instead")
    get = lambda k, d=None: metadata(reader, f"{arch}.{k}", d)
    missing = [k for k in ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")
               if get(k) is None]
    if missing:
        raise CheckpointError(f"GGUF metadata lacks {', '.join(f'{arch}.{k}' for k in missing)}")
    heads = int(get("attention.head_count"))
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    kwargs = dict(
        vocab_size=int(vocab), hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
        num_heads=heads, num_kv_heads=int(get("attention.head_count_kv") or heads),
        head_dim=int(get("attention.key_length") or int(get("embedding_length")) // heads),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        qk_norm=arch == "qwen3", attention_bias="blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(get("context_length") or 32768))
    kwargs.update(overrides)
    try:
        return ModelConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"the GGUF metadata describes a model rlp_jax cannot build: {e}") from None


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's llama q/k permutation: per head, rows (Dh/2, 2) interleaved -> (2, Dh/2)."""
    shape = w.shape
    return w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _dequantized(reader, tensors: dict, name: str) -> np.ndarray:
    """A tensor as float32 in Hugging Face's (torch) layout: [out, in] for matrices."""
    from gguf import GGMLQuantizationType, quants

    t = tensors.get(name)
    if t is None:
        raise CheckpointError(f"GGUF file is missing tensor {name!r}")
    try:
        arr = quants.dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"tensor {name} is stored as {GGMLQuantizationType(t.tensor_type).name}, which the gguf "
                              "package cannot dequantize; convert the file to Q8_0, Q4_K or F16") from None
    return np.asarray(arr, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def from_gguf(path: str | os.PathLike, *, param_dtype: str | None = None, mesh=None, **config_overrides):
    """Load a Llama / Qwen2 / Qwen3 GGUF file into (ModelConfig, params), tensors dequantized on the host.

    Args:
      path: a .gguf file. param_dtype: "float32" (default) or "bfloat16" for the loaded params.
      mesh: a `jax.sharding.Mesh` to load onto: every parameter becomes a global `jax.Array` with its
        `param_logical_axes` sharding and this process keeps only its own devices' slices
        (`weights.assemble`); a block-quantized tensor is dequantized whole, one parameter's tensors at
        a time. None: whole host numpy arrays.
      config_overrides: extra ModelConfig fields (e.g. compute_dtype, remat).
    Returns: (ModelConfig, params pytree, layers stacked on a leading axis).
    """
    from functools import lru_cache

    from rlp_jax.model.dense.weights import assemble

    reader = open_gguf(path)
    cfg = config_from_gguf(reader, param_dtype=param_dtype or "float32", **config_overrides)
    arch = metadata(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    permuted = {"self_attn.q_proj.weight": cfg.num_heads, "self_attn.k_proj.weight": cfg.num_kv_heads,
                "self_attn.q_proj.bias": cfg.num_heads, "self_attn.k_proj.bias": cfg.num_kv_heads}

    def gguf_name(hf_name: str) -> tuple[str, str]:
        suffix = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
        if suffix == hf_name:
            return _GGUF_NAMES[hf_name], suffix
        return f"blk.{hf_name.split('.')[2]}.{_GGUF_NAMES[suffix]}", suffix

    @lru_cache(maxsize=cfg.num_layers)   # one parameter's tensors (every layer): each device's slice reuses them
    def tensor(hf_name: str) -> np.ndarray:
        name, suffix = gguf_name(hf_name)
        arr = _dequantized(reader, tensors, name)
        if arch == "llama" and suffix in permuted:
            arr = _unpermute_rows(arr, permuted[suffix])
        return arr

    def shape_of(hf_name: str) -> tuple:
        name, _ = gguf_name(hf_name)
        if name not in tensors:
            raise CheckpointError(f"GGUF file is missing tensor {name!r}")
        return tuple(int(d) for d in reversed(tensors[name].shape))

    get = lambda hf_name, index: tensor(hf_name) if index is None else tensor(hf_name)[index]
    return cfg, assemble(cfg, leaf_reader(cfg, get, shape_of), mesh)


def gguf_tokenizer(path: str | os.PathLike):
    """The file's tokenizer as (`tokenizers.Tokenizer`, {bos_token, eos_token, pad_token, unk_token,
    chat_template}: the strings the file names, None where it names none).

    Byte-level BPE vocabularies (`tokenizer.ggml.model` = gpt2, as Llama 3, Qwen2/3 and SmolLM use)
    are supported; control tokens become special added tokens, user-defined ones plain added tokens.
    """
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers

    reader = open_gguf(path)
    kind = metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                              "pass the model's Hugging Face tokenizer with --set train.tokenizer=DIR")
    pre = metadata(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}; "
                              "pass the model's Hugging Face tokenizer with --set train.tokenizer=DIR")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges", [])]
    types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                                     fuse_unk=False, byte_fallback=False))
    split, gpt2_regex, digits = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    name = lambda key: (tokens[int(metadata(reader, key))] if metadata(reader, key) is not None else None)
    names = {"bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
             "pad_token": name("tokenizer.ggml.padding_token_id"), "unk_token": name("tokenizer.ggml.unknown_token_id"),
             "chat_template": metadata(reader, "tokenizer.chat_template")}
    return tok, names
