"""Learn a byte-level BPE tokenizer and write it in CLIP's file format (vocab.json + merges.txt).

The files load in `transformers.CLIPTokenizer` and in onnxruntime-extensions' `CLIPTokenizer` op
exactly like OpenAI's CLIP vocabulary: the 256 byte symbols, the same 256 with the `</w>` word-end
marker, one entry per learned merge, then `<|startoftext|>` and `<|endoftext|>`. Text is split with
CLIP's pattern (lower-cased letters runs, single digits, punctuation runs), so any prompt encodes;
words outside the corpus fall back to shorter pieces down to single bytes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's split pattern, restricted to what Python's `re` has (\p{L} -> letters, \p{N} -> digits).
_WORD = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _symbols(word: str, byte_map: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_map[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + "</w>")


def learn(corpus: list[str], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn up to `num_merges` merges from `corpus`; return `(vocab, merges)` in CLIP's layout."""
    byte_map = bytes_to_unicode()
    words = Counter(w for text in corpus for w in _WORD.findall(" ".join(text.lower().split())))
    seqs = {w: _symbols(w, byte_map) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, s in seqs.items():
            for a, b in zip(s, s[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = tuple(out)
    base = list(byte_map.values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def save(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int) -> None:
    """Write `vocab.json`, `merges.txt`, `tokenizer_config.json` and `special_tokens_map.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **special},
        indent=2))
