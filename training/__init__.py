"""nnU-Net v2 training with enlarged batch sizes: convert, plan, train, export.

``python -m training convert|plan|train|export --help``. The modules follow the data flow:
``workspace`` (folders, nnU-Net's environment), ``convert`` (FLARE24 folder -> raw dataset),
``plan`` (fingerprint, plans, preprocessing, batch-size and compact configurations),
``train`` (nnU-Net's trainer, DDP), ``export`` (model folder + manifest).
"""
