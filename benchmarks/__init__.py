"""Benchmarks: our predictor against nnU-Net on the Table 4 sizes (`python -m benchmarks`)."""
