"""Accuracy of lesion predictions (FLARE24 Task 1 DSC / NSD) and model selection.

``python -m evaluation -p PRED_DIR -g GT_DIR`` scores a prediction folder;
``python -m evaluation select`` joins evaluation and profiling reports per model.
Importing the package is cheap: no torch, only numpy, SimpleITK and surface_distance.
"""
