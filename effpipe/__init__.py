"""effpipe: fast, honest transfer-learning pipelines for ImageNet EfficientNets.

The binaries (`python -m effpipe.train`, `.evaluate`, `.predict`, `.tune_batch`,
`.data_service`) read absl flags and build one frozen `effpipe.config.TrainConfig`;
the libraries they call read no flags. The libraries live in layer packages, in the
data's order, and each imports only from the layers before it:

    core (config, config_checks, errors, faults, variants, run_dir) <- data <- model <- outputs <- training <- tune
"""

__version__ = "0.1.0"
