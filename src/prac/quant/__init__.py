"""Quantization: the per-group grid and GPTQ (joint with a mask or on a fixed one), and in
``formats/`` the on-disk formats (compressed-tensors). May import: prac.model, prac.core.
"""
