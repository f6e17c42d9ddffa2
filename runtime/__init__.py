"""qexport_runtime: the device side of qexport (numpy + onnxruntime only, never torch).

Loads a qexport artifact (manifest + ONNX graphs), checks its hashes, and runs the integer sampling
loop with numpy schedulers; measures latency, memory and size. Run `python -m qexport_runtime --help`.
"""

__version__ = "0.1.0"
