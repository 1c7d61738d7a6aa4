"""Several processes: launch, session and failure protocol, the data-parallel engine hooks with exact
tree sums of statistics, hooks that stream blocks through evaluation, and the zero-shot harness.
May import: prac.engine and everything below it.
"""
