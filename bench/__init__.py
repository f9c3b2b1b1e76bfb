"""Clearance benchmarks, side by side with LangGraph, holdpoint and the SQLite ceiling.

Run `python -m bench` (full) or `python -m bench --quick` from the repository
root; see BENCHMARKS.md. Nothing here may import `clearance` at package import
time: `bench/__main__.py` first has to take the repository root off `sys.path`.
"""
