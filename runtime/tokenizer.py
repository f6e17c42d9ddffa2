"""Prompt strings → CLIP token ids on the device: a text-to-image artifact's tokenizer graph in onnxruntime."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np

from .artifact import ArtifactError
from .session import extensions_library, open_session, session_options



class PromptTokenizer:
    """`PromptTokenizer(path, threads=1)` loads the graph written by qexport.export.tokenizer_graph (input
    `prompt` string `[batch]`, output `input_ids` int64 `[batch, max_length]`) with onnxruntime-extensions'
    custom-op library registered; `tokenizer(prompts)` gives the ids transformers' `CLIPTokenizer(prompts,
    padding="max_length", truncation=True)` gives. Prompts are composed to Unicode NFC first, as
    transformers' normalizer does (the graph's ops cannot). Needs numpy, onnxruntime, onnxruntime-extensions."""

    def __init__(self, path: str | Path, threads: int | None = 1):
        self.path = Path(path)
        so = session_options(threads)
        so.register_custom_ops_library(extensions_library("the tokenizer graph"))
        self.session = open_session(self.path, so)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        dims = outputs[0].shape if len(outputs) == 1 else []
        if ([i.name for i in inputs] != ["prompt"] or [o.name for o in outputs] != ["input_ids"]
                or len(dims) != 2 or not isinstance(dims[1], int) or dims[1] < 2):
            raise ArtifactError(f"{self.path}: expected input 'prompt' and output 'input_ids' [batch, max_length]; "
                                f"this is not a qexport tokenizer graph")
        self.max_length = int(dims[1])

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """`[len(prompts), max_length]` int64 token ids: BOS, tokens, EOS, padding (EOS last when cut)."""
        prompts = None if isinstance(prompts, (str, bytes)) else list(prompts)
        if prompts is None or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings (wrap a single prompt in a list)")
        if not prompts:
            return np.zeros((0, self.max_length), dtype=np.int64)
        text = np.array([unicodedata.normalize("NFC", p) for p in prompts], dtype=object)
        ids = self.session.run(None, {"prompt": text})[0]
        return np.ascontiguousarray(ids, dtype=np.int64)
