"""Learned codecs (CompressAI ``CompressionModel`` subclasses)."""
from lmvic.models.single_view import SIZES, SingleViewCodec, build_single_view

__all__ = ["SIZES", "SingleViewCodec", "build_single_view"]
