"""Inputs: checkpoints and data."""
