"""effpipe: fast, honest transfer-learning pipelines for ImageNet EfficientNets.

The training binary is `python -m effpipe.train`; the libraries it calls read no
flags and take a frozen `effpipe.config.TrainConfig`.
"""

__version__ = "0.1.0"
