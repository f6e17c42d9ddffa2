"""Graph passes over the marked FP32 graph, one per file. Their order is declared once, in
qexport.export.pipeline."""

from .batch_time_projections import BatchTimeProjections
from .cancel_bias import CancelBiasRoundTrip
from .collapse_reshapes import CollapseReshapes
from .compact_names import CompactNames
from .detach_bias import DetachBias
from .fold_shapes import FoldShapes
from .groupnorm_affine import GroupNormAffine
from .lower_integer import LowerToInteger
from .narrow_conv import NarrowConvAsPointwise
from .quantize_activations import QuantizeActivations
from .quantize_weights import QuantizeWeights
from .strip_taps import StripTaps
from .tabulate_time_embedding import TabulateTimeEmbedding

__all__ = ["BatchTimeProjections", "CancelBiasRoundTrip", "CollapseReshapes", "CompactNames", "DetachBias", "FoldShapes", "GroupNormAffine", "LowerToInteger", "NarrowConvAsPointwise", "QuantizeActivations", "QuantizeWeights", "StripTaps", "TabulateTimeEmbedding"]
