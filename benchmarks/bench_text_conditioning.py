"""Item-3 study of text-to-image quantization: CFG halves (one table or one per half, one call or
two) and cross-attention K/V / softmax precision, on the shipped text model.

    python benchmarks/bench_text_conditioning.py [--model digits32-t2i] [--artifact ART]

Writes benchmarks/results/text_conditioning.{json,md}. `--artifact` (a converted artifact of the same
model) adds the speed of one CFG-batch call vs two calls of its integer graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    import torch

    from qexport.eval.text_conditioning import format_study, study
    from qexport.zoo.loading import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits32-t2i")
    p.add_argument("--artifact", default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    graph = Path(a.artifact) / "unet_int.onnx" if a.artifact else None
    r = study(load_model(a.model), steps=a.steps, graph_path=graph, threads=a.threads, progress=sys.stderr.isatty())
    r["machine"] = machine_info()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "text_conditioning.json").write_text(json.dumps(r, indent=2))
    text = format_study(r)
    (RESULTS / "text_conditioning.md").write_text(f"# Text-to-image quantization choices ({a.model})\n\n"
                                                  f"Machine: {r['machine']}\n\n```\n{text}\n```\n")
    print(text)


if __name__ == "__main__":
    main()
