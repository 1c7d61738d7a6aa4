"""Leaf utilities every layer uses: the one error type, progress bars, per-layer records, sums in a
fixed tree order (bit-identical at any world size), tensor digests, small linear algebra.
May import: nothing from prac.
"""
