"""Export a model as a Hugging Face checkpoint directory that transformers, vLLM and lm-eval load.

    python -m rlp_jax.export --checkpoint=RUN_DIR_OR_HF_DIR --out=HF_DIR [--step N] [--which params|ema]
                             [--dtype bfloat16|float32] [--force]

Writes `model.safetensors` + `config.json` (`family.to_hf`: the dense or the Nemotron-H layout, tensor by
tensor), `generation_config.json` (bos/eos/pad ids) and the tokenizer as a fast tokenizer (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`) in which `<think>` / `</think>` are added special tokens with the ids the run
trained with.

A run trained with a Hugging Face tokenizer gets its files copied, with the markers added to
`tokenizer.json` if they were missing. A run trained with a sentencepiece `.model` gets a `tokenizer.json`
built from the model's own pieces and settings (`sentencepiece_to_hf`), checked against sentencepiece on
probe texts before anything is written; the `.model` is copied as `tokenizer.model` for reference.

Everything is written into a temporary directory next to `--out` and renamed into place at the end, so a
failed export leaves nothing half-written and an existing `--out` (replaced only with `--force`) intact.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers

from rlp_jax.data.tokenizer import (
    THINK_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)
from rlp_jax.model import family
from rlp_jax.runs.layout import is_url, local_dirs
from rlp_jax.runs.loading import LOAD_ERRORS, load_model

DTYPES = ("float32", "bfloat16")
# Texts the converted tokenizer must encode exactly as sentencepiece does before an export is written.
PROBES = ("Convert 23000 milliliters to liters. The answer is 23.", "a <think> b </think> c",
          "x<think>y</think>z", "<think> 12 + 30 = 42 </think>\n\nSo 42.", "  two leading, trailing spaces  ",
          "tabs\tand\nnewlines\n", "(1/2), 3.5% & #7: [ok]?", "café naïve 日本語 λ 😀")
_COMPANIONS = ("special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


class ExportError(ValueError):
    """An export that cannot be done as asked (one line, with the fix)."""


# ----------------------------------------------------------------------------------------------
# sentencepiece -> tokenizer.json
# ----------------------------------------------------------------------------------------------

def sentencepiece_to_hf(tok: SentencePieceTokenizer) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` that encodes (and decodes) like `tok`, built from the model's pieces.

    BPE: the sentencepiece vocabulary with merges (a, b) for every normal piece a+b whose halves are normal
    pieces, ranked by the score of a+b (sentencepiece merges the adjacent pair whose concatenation scores
    highest). Unigram: the pieces with their scores. Byte fallback as in the model. The normaliser repeats
    sentencepiece's: precompiled rules, extra-whitespace removal, the dummy prefix "▁", spaces -> "▁".
    User-defined pieces (the think markers of `train_sentencepiece`) become added tokens matched *after*
    normalisation, so the dummy prefix lands where sentencepiece puts it ("<think>x" -> "▁", "<think>", "x");
    markers the model lacks (ids V, V+1, split out of the text by `tok`) are matched before it, so every
    piece of text between them gets its own prefix, as `tok` encodes them. Control pieces and `<unk>` are
    special added tokens.

    Exact on every text tested (tests/test_export.py) but for: a text that is exactly one marker (no "▁"
    before it); control-token strings written in the text ("<s>", "</s>", "<pad>", "<unk>"), which become
    those ids as usual in Hugging Face tokenizers; and, for a model without the markers, decoding, which
    keeps the space of each piece's dummy prefix after a marker. Models without byte fallback decode an
    unknown character as "<unk>" rather than sentencepiece's " ⁇ ".
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.sp.serialized_model_proto())
    kind, ns, ts = pb.ModelProto.SentencePiece, proto.normalizer_spec, proto.trainer_spec
    if not ns.escape_whitespaces or ts.treat_whitespace_as_suffix or proto.denormalizer_spec.precompiled_charsmap:
        raise ExportError(f"{tok.path}: sentencepiece models without whitespace escaping, with whitespace as "
                          "suffix or with a denormaliser are not supported; convert the tokenizer yourself")
    pieces = list(proto.pieces)
    if ts.model_type == pb.TrainerSpec.BPE:
        normal = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == kind.NORMAL}
        ranked = sorted((normal[w], w[:k], w[k:]) for w in normal for k in range(1, len(w))
                        if w[:k] in normal and w[k:] in normal)
        model = tokenizers.models.BPE(vocab={p.piece: i for i, p in enumerate(pieces)},
                                      merges=[(a, b) for _, a, b in ranked], unk_token=pieces[ts.unk_id].piece,
                                      fuse_unk=True, byte_fallback=ts.byte_fallback)
    elif ts.model_type == pb.TrainerSpec.UNIGRAM:
        model = tokenizers.models.Unigram([(p.piece, p.score) for p in pieces], unk_id=ts.unk_id,
                                          byte_fallback=ts.byte_fallback)
    else:
        raise ExportError(f"{tok.path}: only BPE and unigram sentencepiece models can be converted, "
                          f"not {pb.TrainerSpec.ModelType.Name(ts.model_type)}")
    out = tokenizers.Tokenizer(model)
    atomic = [p.piece for p in pieces if p.type == kind.USER_DEFINED]
    steps = [normalizers.Precompiled(ns.precompiled_charsmap)] if ns.precompiled_charsmap else []
    if ns.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        # At the start of a non-empty text; not on an atomic piece's own content, which the added-token
        # matcher normalises with this same normaliser and must find unchanged.
        keep = "".join(f"(?!{re.escape(p)}\\z)" for p in atomic)
        steps.append(normalizers.Replace(Regex(rf"\A(?!\z){keep}"), "▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    out.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " ")] + [decoders.ByteFallback()] * ts.byte_fallback + [decoders.Fuse()]
    out.decoder = decoders.Sequence(dec + [decoders.Strip(" ", 1, 0)] * ns.add_dummy_prefix)

    out.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in pieces
                            if p.type in (kind.CONTROL, kind.UNKNOWN)])
    out.add_tokens([AddedToken(p, special=p in THINK_TOKENS, normalized=True) for p in atomic])
    want = dict(zip(THINK_TOKENS, (tok.think_start_id, tok.think_end_id)))
    split = sorted((i, m) for m, i in want.items() if m not in atomic)
    out.add_special_tokens([AddedToken(m, special=True, normalized=False) for _, m in split])
    got = {m: out.token_to_id(m) for m in THINK_TOKENS}
    if got != want or out.get_vocab_size(with_added_tokens=True) != tok.vocab_size:
        raise ExportError(f"{tok.path}: converted think-marker ids {got} differ from the run's {want}")
    return out


def _check_probes(tok: Tokenizer, converted: tokenizers.Tokenizer) -> None:
    for text in PROBES:
        ours, theirs = tok.encode(text), converted.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            raise ExportError(f"the converted tokenizer encodes {text!r} as {theirs[:12]}... but {tok.path} gives "
                              f"{ours[:12]}...; export the weights with rlp_jax.model.dense.hf.to_hf and convert the tokenizer "
                              "yourself")


def _added_json(t: AddedToken) -> dict:
    return {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
            "single_word": t.single_word, "special": t.special}


def _special_names(tok: Tokenizer, id_to_token) -> dict[str, str]:
    names = {k: id_to_token(i) for k, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id),
                                            ("pad_token", tok.pad_id)) if i is not None}
    return {k: v for k, v in names.items() if v is not None}


def _write_sentencepiece(tok: SentencePieceTokenizer, out: Path) -> None:
    converted = sentencepiece_to_hf(tok)
    _check_probes(tok, converted)
    converted.save(str(out / "tokenizer.json"))
    shutil.copy(tok.path, out / "tokenizer.model")
    names = _special_names(tok, converted.id_to_token)
    if tok.sp.unk_id() >= 0:
        names["unk_token"] = tok.sp.id_to_piece(tok.sp.unk_id())
    added = converted.get_added_tokens_decoder()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "extra_special_tokens": list(THINK_TOKENS),
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {str(i): _added_json(t) for i, t in sorted(added.items())}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special_map = {**names, "additional_special_tokens": list(THINK_TOKENS)}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False))


def _write_hf_tokenizer(tok: HFTokenizer, out: Path) -> None:
    """Copy the tokenizer files; `tokenizer.json` is rewritten with the think markers as special tokens."""
    if tok.path.name == "tokenizer.json":
        for f in tok.path.parent.iterdir():
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in _COMPANIONS or f.suffix == ".model"):
                shutil.copy(f, out / f.name)
    tok.tok.save(str(out / "tokenizer.json"))  # HFTokenizer added the markers if they were missing
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if tok.chat_template:
        config.setdefault("chat_template", tok.chat_template)
    for key, name in _special_names(tok, tok.tok.id_to_token).items():
        config.setdefault(key, name)
    decoder = config.setdefault("added_tokens_decoder", {})
    added = tok.tok.get_added_tokens_decoder()
    for i in (tok.think_start_id, tok.think_end_id):
        decoder[str(i)] = _added_json(added[i])
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------

def _check_out(out: Path, source: Path, force: bool) -> None:
    if out.is_file():
        raise ExportError(f"--out {out} is a file; pass a directory path")
    src = local_dirs(source)[0].resolve()   # a gs:// run: its local mirror
    if out.resolve() == src or out.resolve() in src.parents:
        raise ExportError(f"--out {out} would replace the checkpoint {source} itself; pass another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; pass --force to replace it or choose another path")


def export(path, out, *, step: int | None = None, which: str = "params", dtype: str | None = None,
           force: bool = False) -> Path:
    """Write the model at `path` (run or Hugging Face dir) as a Hugging Face checkpoint directory `out`.

    Args:
      path: an rlp_jax run directory or a Hugging Face checkpoint dir. step: checkpoint step of a run
      (default: latest). which: "params" (policy) or "ema" (the EMA teacher). dtype: "float32" or
      "bfloat16" for the saved weights (default: the model's storage dtype). force: replace a non-empty `out`.
    Returns: `out`. Raises ExportError or one of `rlp_jax.runs.loading.LOAD_ERRORS` (one-line messages); on error
    `out` is left as it was.

    Multi-host (every process runs the same command): each process loads its own slices, every tensor is
    gathered one at a time, and process 0 alone writes `out`.
    """
    import jax
    from jax.experimental import multihost_utils

    path, out = (path if is_url(path) else Path(path)), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _check_out(out, path, force)
    lm = load_model(path, step=step, which=which)
    cfg, tok = lm.cfg, lm.tokenizer
    rows = lm.params["embed"].shape[0]
    if rows != cfg.vocab_size or tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"{path}: embedding has {rows} rows, config says vocab_size {cfg.vocab_size}, the "
                          f"tokenizer has {tok.vocab_size} ids; the checkpoint and its tokenizer disagree")
    # Several hosts: every process joins each tensor's gather, process 0 alone writes, and all of them end with
    # process 0's outcome (a failed write on process 0 must not leave the others waiting at a collective).
    agreed = lambda ok: bool(multihost_utils.broadcast_one_to_all(np.int32(ok))) if jax.process_count() > 1 else ok
    if jax.process_index() != 0:
        family.to_hf(lm.params, cfg, out, dtype=dtype)   # joins the gathers; writes nothing
        if not agreed(True):
            raise ExportError(f"process 0 could not write {out}; its error line says why")
        return out
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        family.to_hf(lm.params, cfg, tmp, dtype=dtype)
        ids = {k: v for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id),
                                 ("pad_token_id", tok.pad_id)) if v is not None}
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**config, **ids}, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2))
        if isinstance(tok, SentencePieceTokenizer):
            _write_sentencepiece(tok, tmp)
        else:
            _write_hf_tokenizer(tok, tmp)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        agreed(False)
        raise
    agreed(True)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    p = _Parser(prog="python -m rlp_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="rlp_jax run directory, Hugging Face checkpoint dir or .gguf file")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write")
    p.add_argument("--step", type=int, help="checkpoint step of a run directory (default: latest)")
    p.add_argument("--which", choices=("params", "ema"), default="params", help="policy or EMA teacher")
    p.add_argument("--dtype", help=f"weights dtype: {' or '.join(DTYPES)} (default: the model's)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    args = p.parse_args(argv)
    from rlp_jax import sharding

    sharding.maybe_initialize_distributed()
    try:
        out = export(args.checkpoint, args.out, step=args.step, which=args.which, dtype=args.dtype, force=args.force)
    except (ExportError, *LOAD_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() == 0:
        print(f"exported {args.checkpoint} ({args.which}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
