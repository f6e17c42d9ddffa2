"""qexport: time-step-aware integer quantization of diffusion U-Nets, exported to ONNX.

The package is the toolchain side (torch, diffusers, onnx). Importing it stays light: heavy
dependencies are imported inside the functions that need them, so the CLI's runtime-only
commands work in an install without torch.
"""

__version__ = "0.1.0"
