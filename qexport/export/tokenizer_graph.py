r"""The tokenizer graph of a text-to-image artifact: prompt strings → CLIP token ids, inside ONNX.

`build_tokenizer_graph(tokenizer_dir, max_length=None)` reads a CLIP BPE tokenizer folder (`vocab.json`,
`merges.txt`, `tokenizer_config.json` / `special_tokens_map.json`) and returns an ONNX model with input
`prompt` (string `[batch]`) and output `input_ids` (int64 `[batch, max_length]`) equal to
`transformers.CLIPTokenizer(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids`:
BOS, the tokens, EOS, then pad ids; a prompt too long keeps its first `max_length - 2` tokens and EOS
stays last. `max_length` defaults to the folder's `model_max_length`.

The graph runs on onnxruntime with onnxruntime-extensions' custom-op library registered
(`SessionOptions().register_custom_ops_library(onnxruntime_extensions.get_library_path())`). Nodes:

1. `StringRegexReplace` passes (domain `ai.onnx.contrib`, RE2 syntax, global replacement) that cut the
   text into transformers' pre-tokenizer pieces and put a separator (an added token of the op) between
   any two. The op alone disagrees with transformers because it pre-tokenizes with GPT-2's regex and its
   own white-space cleaning: "42" stays one word (merged "4" + "2</w>"; transformers: "4</w>" "2</w>"),
   "x 's" gives "'</w>" "s</w>" (transformers: the contraction "'s"), a tab survives as a token, a
   newline is deleted and glues its neighbours, "<|ENDOFTEXT|>" becomes the special token (transformers
   matches special tokens case-sensitively on the raw text, the op after lowercasing), and a piece that
   ends in a space before a special token ("a <|endoftext|>") crashes the process. The passes: white-space
   runs → one space (transformers' normalizer); the exact special tokens → a \v / \f marker; "İ" → its
   lower case "i\u0307"; transformers' CLIP split regex, each piece wrapped in separators (a special token
   in another case as its three byte-level pieces "<|", name, "|>"); spaces deleted; markers → the special
   tokens. The op then tokenizes each piece on its own, as transformers' byte-level BPE does.
2. `CLIPTokenizer` (domain `ai.onnx.contrib`), string attributes `vocab` (vocab.json's text), `merges`
   (merges.txt's text) and `added_token` ("<separator>=<id>", the id one past the vocabulary), int
   `padding_length = -1` (no cut in the op: with a padding length it writes length + 1 ids per row, EOS
   after the cut, into rows of length ids, shifting the next rows and writing past its output). Outputs
   `ids` and `attention_mask` `[batch, longest]`, BOS and EOS added.
3. Standard ONNX ops: the separators are dropped (ScatterElements of the kept ids to their rank), the rows
   padded with the pad id or cut to `max_length`, and a cut row ends in EOS, as transformers' `truncation`.

Differences from transformers that the graph cannot reach (tests/test_tokenizer_graph.py shows each):
no NFC composition in the graph (a decomposed "e\u0301" is e + combining accent, not "é"; the device-side
`qexport_runtime.tokenizer.PromptTokenizer` composes prompts with NFC first); U+0000 ends the prompt for
the op; the op takes U+001C..U+001F for white space and merges a run of them into one; characters added in
Unicode 14 and later are not letters (nor digits, nor lower-cased) to the op.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import QexportError

CONTRIB = "ai.onnx.contrib"
OPSET = 17
IR_VERSION = 8          # onnxruntime ≥ 1.10 loads it (the device runtime may be older than the toolchain)
# The op's CLIP configuration is fixed in onnxruntime-extensions (bpe_kernels.cc, kCLIPConfiguration).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Piece separator: an added token of the op whose id the graph drops. It holds a tab, which no prompt has
# left after the first pass; DEL around it keeps the op's white-space trimming away from its neighbours.
SEPARATOR = "\x7f\t\x7f"
# transformers' `\s` (Unicode White_Space); RE2's own `\s` is ASCII only.
WHITE_SPACE = r"[\t-\r \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]+"
# transformers' CLIP pre-tokenizer regex (applied after lowercasing there, so case-insensitive here), with
# groups for the rewrite: 1-3 a special token in another case ("<|", name, "|>": its byte-level pieces),
# 4 any other piece. White space is no piece: the \v and \f markers below are not either.
PIECES = (r"(<\|)((?i:startoftext|endoftext))(\|>)"
          r"|('[sStT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|\pL+|\pN|[^ \t\n\v\f\r\pL\pN]+)")
# (pattern, rewrite) for the StringRegexReplace passes, in order (RE2 syntax, global replacement; a rewrite
# is literal text but for \1..\9).
TEXT_PASSES = (
    (WHITE_SPACE, " "),
    # the exact special tokens are split off first (transformers matches them on the raw text): a vertical
    # tab / form feed stands for each while the pieces are cut
    (r"<\|startoftext\|>", "\v"),
    (r"<\|endoftext\|>", "\f"),
    # the one letter whose lower case is two characters, a letter and a combining mark (no letter): as the
    # pieces are cut from lower-case text there, "İ~" is "i" + "\u0307~"
    ("\u0130", "i\u0307"),
    (PIECES, SEPARATOR + r"\1" + SEPARATOR + r"\2" + SEPARATOR + r"\3\4" + SEPARATOR),
    (" +", ""),                                   # every boundary is marked now; spaces could only harm
    (r"\v", SEPARATOR + BOS + SEPARATOR),
    (r"\f", SEPARATOR + EOS + SEPARATOR),
)
FIX = "point at a CLIP tokenizer folder (a diffusers pipeline's tokenizer/) that has vocab.json and merges.txt"


def _token(value) -> str | None:
    """A special token from a tokenizer config: a string or an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QexportError(f"{path} is not readable JSON ({type(e).__name__}); {FIX}") from None
    if not isinstance(data, dict):
        raise QexportError(f"{path} is not a JSON object; {FIX}")
    return data


def read_tokenizer_folder(tokenizer_dir: Path) -> dict:
    """vocab/merges text, special-token ids and model_max_length of a CLIP tokenizer folder, checked."""
    tokenizer_dir = Path(tokenizer_dir)
    missing = [f for f in ("vocab.json", "merges.txt") if not (tokenizer_dir / f).is_file()]
    if missing:
        raise QexportError(f"{tokenizer_dir} has no {' or '.join(missing)}; the tokenizer graph needs the CLIP BPE "
                           f"vocabulary and merges: {FIX}")
    vocab_text = (tokenizer_dir / "vocab.json").read_text(encoding="utf-8")
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8")
    vocab = _read_json(tokenizer_dir / "vocab.json")
    if not merges.strip():
        raise QexportError(f"{tokenizer_dir / 'merges.txt'} is empty; {FIX}")
    config = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):   # the second wins, as in transformers
        if (tokenizer_dir / name).is_file():
            config.update({k: v for k, v in _read_json(tokenizer_dir / name).items() if _token(v) is not None
                           or k == "model_max_length"})
    special = {k: _token(config.get(f"{k}_token")) or d for k, d in (("bos", BOS), ("eos", EOS), ("pad", EOS),
                                                                    ("unk", EOS))}
    if special["bos"] != BOS or special["eos"] != EOS or not {special["pad"], special["unk"]} <= {BOS, EOS}:
        raise QexportError(f"{tokenizer_dir}: special tokens {special} are not CLIP's (bos {BOS}, eos/pad/unk {EOS}); "
                           f"onnxruntime-extensions' CLIPTokenizer supports only those")
    absent = sorted({t for t in special.values() if t not in vocab})
    if absent:
        raise QexportError(f"{tokenizer_dir / 'vocab.json'} lacks the special token(s) {absent}; {FIX}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
        raise QexportError(f"{tokenizer_dir / 'vocab.json'} maps some token to something else than an id ≥ 0; {FIX}")
    ids = {k: int(vocab[t]) for k, t in special.items()}
    return dict(vocab=vocab_text, merges=merges, ids=ids, max_id=max(vocab.values()),
                model_max_length=config.get("model_max_length"))


def _const(name: str, value, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _string(name: str, value: str) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.STRING, [], [value.encode("utf-8")])


def build_tokenizer_graph(tokenizer_dir: Path, max_length: int | None = None) -> onnx.ModelProto:
    """ONNX graph `prompt` (string [batch]) → `input_ids` (int64 [batch, max_length]); see the module docstring."""
    tok = read_tokenizer_folder(Path(tokenizer_dir))
    if max_length is None:
        max_length = tok["model_max_length"]
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 <= max_length <= 1 << 20:
            raise QexportError(f"{tokenizer_dir}: tokenizer_config.json has no usable model_max_length "
                               f"({max_length!r}); pass max_length (the text encoder's token count)")
    max_length = int(max_length)
    if max_length < 2:
        raise QexportError(f"max_length {max_length} leaves no room for BOS and EOS; pass the text encoder's token "
                           f"count (≥ 2)")
    ids = tok["ids"]
    sep_id = tok["max_id"] + 1                    # outside the vocabulary: only the separator has it

    inits = [_const("max_len", [max_length]), _const("max_len_scalar", max_length),
             _const("positions", np.arange(max_length)[None, :]), _const("zero", [0]), _const("one", 1),
             _const("one_axis", [1]), _const("pad_id", ids["pad"]), _const("eos_id", ids["eos"]),
             _const("sep_id", sep_id), _const("last", max_length - 1)]
    nodes, text = [], "prompt"
    for i, (pattern, rewrite) in enumerate(TEXT_PASSES):
        inits += [_string(f"pattern_{i}", pattern), _string(f"rewrite_{i}", rewrite)]
        nodes.append(helper.make_node("StringRegexReplace", [text, f"pattern_{i}", f"rewrite_{i}"], [f"text_{i}"],
                                      domain=CONTRIB, name=f"pieces_{i}", global_replace=1))
        text = f"text_{i}"
    nodes += [
        helper.make_node("CLIPTokenizer", [text], ["ids", "mask"], domain=CONTRIB, name="clip_bpe",
                         vocab=tok["vocab"], merges=tok["merges"], padding_length=-1,
                         added_token=f"{SEPARATOR}={sep_id}"),
        # ids [batch, T] (BOS, tokens and separators, EOS, then the op's padding): keep tokens, drop separators
        helper.make_node("Cast", ["mask"], ["valid"], to=TensorProto.BOOL),
        helper.make_node("Equal", ["ids", "sep_id"], ["is_sep"]),
        helper.make_node("Not", ["is_sep"], ["not_sep"]),
        helper.make_node("And", ["valid", "not_sep"], ["keep"]),
        helper.make_node("Cast", ["keep"], ["keep_i"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["keep_i", "one_axis"], ["length"], keepdims=1),     # [batch, 1]
        # the k-th kept id of a row goes to column k, a dropped id at column t to T + max_length + t (never read)
        helper.make_node("CumSum", ["keep_i", "one"], ["kept_upto"]),
        helper.make_node("Sub", ["kept_upto", "one"], ["col"]),
        helper.make_node("Shape", ["ids"], ["ids_shape"]),
        helper.make_node("ConstantOfShape", ["ids_shape"], ["ones"],
                         value=numpy_helper.from_array(np.ones(1, np.int64))),
        helper.make_node("CumSum", ["ones", "one"], ["t_upto"]),
        helper.make_node("Sub", ["t_upto", "one"], ["t"]),
        helper.make_node("Shape", ["ids"], ["batch"], start=0, end=1),
        helper.make_node("Shape", ["ids"], ["width"], start=1, end=2),
        helper.make_node("Add", ["width", "max_len"], ["dump_start"]),
        helper.make_node("Add", ["t", "dump_start"], ["dump"]),
        helper.make_node("Where", ["keep", "col", "dump"], ["target"]),
        helper.make_node("Add", ["dump_start", "width"], ["wide_width"]),
        helper.make_node("Concat", ["batch", "wide_width"], ["wide_shape"], axis=0),
        helper.make_node("Expand", ["pad_id", "wide_shape"], ["pads"]),
        helper.make_node("ScatterElements", ["pads", "target", "ids"], ["wide"], axis=1),
        helper.make_node("Slice", ["wide", "zero", "max_len", "one_axis"], ["head"]),
        # truncated prompt: EOS at the last position, as transformers' truncation=True does
        helper.make_node("Greater", ["length", "max_len_scalar"], ["too_long"]),
        helper.make_node("Equal", ["positions", "last"], ["at_last"]),
        helper.make_node("And", ["too_long", "at_last"], ["put_eos"]),
        helper.make_node("Where", ["put_eos", "eos_id", "head"], ["input_ids"]),
    ]
    graph = helper.make_graph(
        nodes, "clip_tokenizer",
        [helper.make_tensor_value_info("prompt", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", max_length])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB, 1)],
                              producer_name="qexport", ir_version=IR_VERSION)
    model.doc_string = (f"CLIP BPE tokenizer: prompt strings → input_ids [batch, {max_length}] (BOS, tokens, EOS, "
                        f"pad); needs onnxruntime-extensions")
    helper.set_model_props(model, {"qexport.tokenizer": "clip-bpe", "max_length": str(max_length),
                                   "bos_id": str(ids["bos"]), "eos_id": str(ids["eos"]), "pad_id": str(ids["pad"])})
    return model
