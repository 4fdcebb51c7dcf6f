"""Exact Hessian diagonals, coordinate sampling and statistics: pure torch/numpy, no printing."""
