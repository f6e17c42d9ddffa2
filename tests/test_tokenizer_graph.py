"""The in-graph CLIP tokenizer gives transformers' ids, also on the device side without torch."""

import json
import random
import shutil
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from .test_runtime_without_torch import run_blocked

pytest.importorskip("onnx", reason="building the graph needs the toolchain extra")
ort = pytest.importorskip("onnxruntime")
ortx = pytest.importorskip("onnxruntime_extensions")
transformers = pytest.importorskip("transformers")

from qexport.errors import QexportError  # noqa: E402
from qexport.export.tokenizer_graph import build_tokenizer_graph  # noqa: E402
from qexport.zoo import prompts as zoo_prompts  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "qexport" / "zoo" / "shipped" / "digits32-t2i" / "tokenizer"
MAX_LENGTH = 16
LONG = "a handwritten seven, a handwritten eight, a photo of the number nine and a drawing of a zero"
HARD = [
    "", " ", "   \t\n ", "THE DIGIT SEVEN", "A Handwritten ZERO", "the digit five!", "five, six; seven...",
    "(eight) [nine] {zero}", "the number 42", "digit 7", "3.14159", "1,000,000 digits", "x² ½ ٣",
    "  the   digit\tthree\n", "héllo wörld", "Ünïcödé àccénts", "İstanbul", "naïve café ﬁne", "日本語の数字",
    "emoji 😀 digit", "don't", "it's a seven", "the digit 's", "it 'S", "# 's", "'ll 've 're 'd 'm 't",
    LONG, "giraffe quantum xylophone", "zebra", "<|startoftext|> seven", "a <|endoftext|> b",
    "<|ENDOFTEXT|>", "#<|EndOfText|>!", "tab\there", "new\nline", "crlf\r\nline", "nbsp\u00a0space",
    "ideographic\u3000space", "soft\u00adhyphen", "zero\u200bwidth", "\ufeffbom", "del\x7fchar", "ctrl\x01a",
]


def _session(model):
    so = ort.SessionOptions()
    so.register_custom_ops_library(ortx.get_library_path())
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(session, prompts: list[str]) -> np.ndarray:
    return session.run(None, {"prompt": np.array(prompts, dtype=object)})[0]


@pytest.fixture(scope="module")
def hf():
    return transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def reference(hf, prompts: list[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    return np.array(hf(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids,
                    dtype=np.int64)


@pytest.fixture(scope="module")
def model():
    return build_tokenizer_graph(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def session(model):
    return _session(model)


def _all_prompts() -> list[str]:
    return list(dict.fromkeys(zoo_prompts.corpus() + zoo_prompts.eval_prompts()
                              + zoo_prompts.calibration_prompts() + HARD))


def test_graph_matches_transformers(hf, session):
    prompts = _all_prompts()
    assert len(prompts) >= 50
    want = reference(hf, prompts)
    got = _run(session, prompts)
    assert got.dtype == np.int64 and got.shape == (len(prompts), MAX_LENGTH)
    bad = [(p, got[i].tolist(), want[i].tolist()) for i, p in enumerate(prompts) if not (got[i] == want[i]).all()]
    assert not bad, bad[:5]
    # the set exercises what it claims to: a cut prompt (EOS last, no padding), digits one token each
    long_ids = hf(LONG).input_ids
    assert len(long_ids) > MAX_LENGTH
    cut = got[prompts.index(LONG)]
    assert cut[-1] == hf.eos_token_id and cut[:-1].tolist() == long_ids[:MAX_LENGTH - 1]
    assert got[prompts.index("")].tolist() == [hf.bos_token_id] + [hf.eos_token_id] * (MAX_LENGTH - 1)
    assert hf.convert_ids_to_tokens(got[prompts.index("the number 42")][3:5].tolist()) == ["4</w>", "2</w>"]


def test_random_strings_match_transformers(hf, session):
    """Seeded random strings over letters, digits, symbols, contractions, white space and special tokens."""
    alphabet = list("abcxyzAEZ0123456789 '.,!?-_<>|/\\()[]\"#@$%&*~`+=:;") + [
        "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "é", "É", "ö", "ß", "İ", "ı", "日本", "😀", "²", "½", "٣", "'s",
        "'T", "'re", "'LL", "n't", "<|startoftext|>", "<|endoftext|>", "<|EndOfText|>", "digit", "the", "Σ", "ﬁ",
        "\u200b", "\ufeff", "\u00ad", "\x7f", "\x01"]
    rng = random.Random(0)
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(1500)]
    got, want = _run(session, prompts), reference(hf, prompts)
    bad = [(p, got[i].tolist(), want[i].tolist()) for i, p in enumerate(prompts) if not (got[i] == want[i]).all()]
    assert not bad, bad[:5]


@pytest.mark.parametrize("max_length", [2, 5, 77])
def test_other_lengths(hf, max_length):
    prompts = ["", "a handwritten seven", LONG, "the number 1234567890"]
    got = _run(_session(build_tokenizer_graph(TOKENIZER_DIR, max_length)), prompts)
    assert got.tolist() == reference(hf, prompts, max_length).tolist()


def test_graph_is_plain_onnx(model, tmp_path):
    import onnx

    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} == {"", "ai.onnx.contrib"}
    op = next(n for n in model.graph.node if n.op_type == "CLIPTokenizer")
    assert op.domain == "ai.onnx.contrib"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
    assert json.loads(attrs["vocab"]) == json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert attrs["merges"].decode() == (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8")
    assert attrs["padding_length"] == -1
    [inp], [out] = model.graph.input, model.graph.output
    assert (inp.name, inp.type.tensor_type.elem_type) == ("prompt", onnx.TensorProto.STRING)
    assert (out.name, out.type.tensor_type.elem_type) == ("input_ids", onnx.TensorProto.INT64)
    assert out.type.tensor_type.shape.dim[1].dim_value == MAX_LENGTH
    # a file on disk loads as the runtime loads it
    path = tmp_path / "tokenizer.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.register_custom_ops_library(ortx.get_library_path())
    assert ort.InferenceSession(str(path), so).run(None, {"prompt": np.array(["zero"], dtype=object)})[0].shape \
        == (1, MAX_LENGTH)


def test_known_differences_of_the_graph(hf, session):
    """What the graph cannot match (see qexport.export.tokenizer_graph). If one of these starts to agree, an
    onnxruntime-extensions upgrade fixed it: update the docstring and move the prompt to HARD."""
    decomposed = unicodedata.normalize("NFD", "héllo wörld")
    assert decomposed != "héllo wörld"
    cases = {
        decomposed: "no NFC in the graph (PromptTokenizer composes first)",
        "a\x00b": "U+0000 ends the prompt for the op",
        "a\x1c\x1cb": "the op merges a run of U+001C..U+001F as white space",
        "a\u0870b": "U+0870 (Unicode 14) is a letter to transformers, not to the op",
    }
    got, want = _run(session, list(cases)), reference(hf, list(cases))
    for i, (p, why) in enumerate(cases.items()):
        assert (got[i] != want[i]).any(), f"{p!r} now matches transformers ({why})"
    # the NFC-composed prompt agrees
    composed = unicodedata.normalize("NFC", decomposed)
    assert (_run(session, [composed]) == reference(hf, [decomposed])).all()


def test_device_tokenizer_without_torch(hf, model, tmp_path):
    import onnx

    path = tmp_path / "tokenizer.onnx"
    onnx.save(model, str(path))
    prompts = _all_prompts() + [unicodedata.normalize("NFD", "héllo wörld")]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = run_blocked(f"""
        import json, sys
        from qexport_runtime.tokenizer import PromptTokenizer
        tok = PromptTokenizer({str(path)!r})
        prompts = json.loads(open({str(tmp_path / 'prompts.json')!r}).read())
        ids = tok(prompts)
        assert ids.dtype.name == "int64" and tok.max_length == {MAX_LENGTH}, (ids.dtype, tok.max_length)
        assert tok([]).shape == (0, {MAX_LENGTH})
        heavy = [m for m in ("torch", "transformers", "onnx") if m in sys.modules]
        print(json.dumps(dict(ids=ids.tolist(), heavy=heavy)))
    """, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["heavy"] == []
    assert res["ids"] == reference(hf, prompts).tolist()


def test_device_tokenizer_asks_for_extensions(model, tmp_path):
    import onnx

    path = tmp_path / "tokenizer.onnx"
    onnx.save(model, str(path))
    out = run_blocked(f"""
        import importlib.abc, sys
        class NoExtensions(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'onnxruntime_extensions':
                    raise ImportError('blocked')
        sys.meta_path.insert(0, NoExtensions())
        from qexport_runtime.artifact import ArtifactError
        from qexport_runtime.tokenizer import PromptTokenizer
        try:
            PromptTokenizer({str(path)!r})
        except ArtifactError as e:
            print(e)
    """, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install onnxruntime-extensions" in out.stdout and out.stdout.strip().count("\n") == 0


def test_device_tokenizer_refuses_a_truncated_graph(model, tmp_path):
    from qexport_runtime.artifact import ArtifactError
    from qexport_runtime.tokenizer import PromptTokenizer

    path = tmp_path / "tokenizer.onnx"
    data = model.SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as e:
        PromptTokenizer(path)
    msg = str(e.value)
    assert str(path) in msg and "onnxruntime cannot load this graph" in msg and "re-export" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_missing_file_is_a_clear_error(tmp_path, missing):
    folder = tmp_path / "tokenizer"
    shutil.copytree(TOKENIZER_DIR, folder)
    (folder / missing).unlink()
    with pytest.raises(QexportError) as e:
        build_tokenizer_graph(folder)
    msg = str(e.value)
    assert missing in msg and str(folder) in msg and "\n" not in msg
    assert ("merges.txt" if missing == "vocab.json" else "vocab.json") in msg   # the fix names both files
