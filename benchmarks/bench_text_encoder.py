"""Text encoder of a text-to-image artifact: FP32 or int8 weights-only? Measured, not assumed.

    python benchmarks/bench_text_encoder.py ART [--samples 200]

Builds an int8 weights-only copy of the artifact's `text_encoder.onnx` (every MatMul/Gemm weight
initializer → int8, symmetric per output column, a DequantizeLinear in front; activations stay float)
and compares it with the FP32 encoder: file bytes, the embeddings' relative RMS error on the ten
evaluation prompts and the empty prompt, and end to end — the artifact's integer U-Net sampling the
evaluation prompts with each encoder (same seeds): PSNR between the two image sets and the prompt
adherence of each. Writes benchmarks/results/text_to_image/text_encoder.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "text_to_image"


def weights_only_int8(src: Path, dst: Path) -> int:
    """Quantize every 2-D float weight initializer feeding MatMul/Gemm; returns how many."""
    m = onnx.load(str(src))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consumers = {}
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm"):
            for i in n.input:
                if i in inits and numpy_helper.to_array(inits[i]).ndim == 2:
                    consumers.setdefault(i, []).append(n)
    nodes = []
    for name in consumers:
        w = numpy_helper.to_array(inits[name]).astype(np.float32)   # MatMul B: [in, out] → per output column
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        g.initializer.remove(inits[name])
        g.initializer.extend([numpy_helper.from_array(q, f"{name}_q"),
                              numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale")])
        nodes.append(onnx.helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale"], [name], axis=1))
    for n in reversed(nodes):
        g.node.insert(0, n)
    if m.opset_import[0].version < 13:
        m.opset_import[0].version = 13
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return len(nodes)


def main() -> None:
    import onnxruntime as ort

    from qexport.eval.features import load_extractor
    from qexport.eval.metrics import psnr
    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.session import session_options
    from qexport_runtime.text2image import TextToImage
    from qexport.zoo.prompts import EMPTY_PROMPT, eval_prompts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    art = load_artifact(a.artifact)
    src = Path(a.artifact) / "text_encoder.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "text_encoder_w8.onnx"
        n = weights_only_int8(src, dst)
        pipe = TextToImage(art, threads=a.threads)
        prompts = [EMPTY_PROMPT, *eval_prompts()]
        ids = pipe.tokenizer(prompts)
        e32 = pipe.text_encoder.run(None, {"input_ids": ids})[0]
        enc8 = ort.InferenceSession(str(dst), session_options(a.threads), providers=["CPUExecutionProvider"])
        e8 = enc8.run(None, {"input_ids": ids})[0]
        rel = float(np.sqrt(((e8 - e32) ** 2).mean() / (e32 ** 2).mean()))
        bytes8 = dst.stat().st_size
        classes = np.arange(a.samples) % 10
        plist = [eval_prompts()[c] for c in classes]
        out = {}
        for label, enc in (("fp32", pipe.text_encoder), ("int8-weights", enc8)):
            pipe.text_encoder = enc
            imgs = [pipe.generate(plist[i:i + 50], steps=25, batch=len(plist[i:i + 50]), seed=i // 50).images
                    for i in range(0, a.samples, 50)]
            out[label] = np.concatenate(imgs)
    ext = load_extractor()
    adherence = {k: float((ext.labels(v) == classes).mean()) for k, v in out.items()}
    r = dict(machine=machine_info(), artifact=a.artifact, matmul_weights_quantized=n, bytes_fp32=src.stat().st_size,
             bytes_int8_weights=bytes8, embedding_rel_rms=rel, samples=a.samples,
             psnr_db_int8_vs_fp32_encoder=float(np.minimum(psnr(out["int8-weights"], out["fp32"]), 100).mean()),
             prompt_adherence=adherence)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "text_encoder.json").write_text(json.dumps(r, indent=2))
    md = (f"# Text encoder: FP32 vs int8 weights-only ({a.artifact})\n\n{r['machine']['cpu']}, {r['machine']['isa']}\n\n"
          f"| encoder | bytes | embedding rel. RMS error | prompt adherence ({a.samples} samples) | PSNR vs FP32-encoder images |\n"
          f"|---|---|---|---|---|\n| FP32 | {r['bytes_fp32']:,} | 0 | {adherence['fp32']:.2%} | — |\n"
          f"| int8 weights-only ({n} MatMul weights) | {bytes8:,} | {rel:.4f} | {adherence['int8-weights']:.2%} | "
          f"{r['psnr_db_int8_vs_fp32_encoder']:.2f} dB |\n")
    (RESULTS / "text_encoder.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
