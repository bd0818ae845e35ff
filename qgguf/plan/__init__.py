"""Stages 2 and 3, measure and plan: the error and bytes of every (tensor, type), then one type per tensor under a
budget.

measure.py (the real encoder's error on sampled rows, cached), rules.py (what is planned, with which types),
budget.py (sizes and the file layout), solver.py (the knapsack), planner.py (the plan), outputs.py (what it
leaves beside the GGUF)."""
