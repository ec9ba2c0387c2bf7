"""CUDA backend tests executed under numba-cuda's simulator (see conftest.py)."""
