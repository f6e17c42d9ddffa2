"""Graph passes over the marked FP32 graph, one per file. Their order is declared once, in
qexport.export.pipeline."""

from .strip_taps import StripTaps

__all__ = ["StripTaps"]
