"""Graph passes over the marked FP32 graph, one per file. Their order is declared once, in
qexport.export.pipeline."""

from .compact_names import CompactNames
from .detach_bias import DetachBias
from .lower_integer import LowerToInteger
from .quantize_activations import QuantizeActivations
from .quantize_weights import QuantizeWeights
from .strip_taps import StripTaps

__all__ = ["CompactNames", "DetachBias", "LowerToInteger", "QuantizeActivations", "QuantizeWeights", "StripTaps"]
