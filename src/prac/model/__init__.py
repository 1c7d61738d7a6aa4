"""The model's structure and what is measured on it: transformer blocks and their prunable units,
MoE experts and routes, loading (folders, hub ids, GGUF), and the input statistics (XᵀX) of every
linear with the factorisations shared by linears of one input. May import: prac.core.
"""
