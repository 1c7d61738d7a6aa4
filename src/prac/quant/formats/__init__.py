"""On-disk formats of quantized and sparse weights (compressed-tensors' pack-quantized and bitmask).
May import: prac.quant, prac.model, prac.core.
"""
