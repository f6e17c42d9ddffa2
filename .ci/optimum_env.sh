#!/usr/bin/env bash
# Create a virtual environment at "$1" with Hugging Face optimum-onnx (the ONNX Runtime diffusion
# pipelines that tests/test_optimum_layout.py runs a qexport artifact's optimum view in); point
# QEXPORT_OPTIMUM_PYTHON at "$1/bin/python". Separate from qexport's own environment because
# optimum-onnx 0.1.0 needs transformers < 4.58. torch is pinned exactly: any looser spec pulls a
# multi-GB CUDA build.
set -euo pipefail
if (($# != 1)); then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
python3 -m venv "$1"
"$1/bin/pip" install -q torch==2.13.0 "optimum-onnx[onnxruntime]==0.1.0" diffusers "transformers<4.58" >/dev/null
