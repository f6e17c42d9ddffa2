"""Export: the FP32 ONNX graph with tap markers, the graph passes that quantize it, the artifact."""
