"""The model layer: the network, and the parts of it each phase trains.

Owns the on-device augmentation fused with the resize (`augment`), the EfficientNet
base and head (`efficientnet`), freezing and unfreezing by blocks (`freezing`), the
BatchNormalization calibration of a random base (`batch_norm`), and the model and
compiled step built from a config (`factory`), shared by the trainer, the tuner and
the benchmarks.

May import: the core modules and `effpipe.data`.
"""
