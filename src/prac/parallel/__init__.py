"""Several processes: the data-parallel session (ranks, exact tree sums of statistics), hooks that
stream blocks through evaluation, and the zero-shot harness.
May import: prac.engine and everything below it.
"""
