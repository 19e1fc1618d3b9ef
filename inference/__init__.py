"""Lean nnU-Net v2 predictor for FLARE24 (``python -m inference``).

Importing the package is cheap: torch is imported by the modules that need it, so that
``inference.nifti`` can serve the profiler and evaluation tools without the model stack.
"""
