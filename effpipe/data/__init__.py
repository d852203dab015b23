"""The data layer: where images come from and how they reach the device.

Owns the sources (CIFAR-100 and any image dataset of tensorflow-datasets, a folder
of images, the synthetic shapes), the decoding of image files (`decode`), the
decoded-image cache (`cache`, `stores`), the train/validation/test splits, and the
host tf.data chain that batches uint8 images for the compiled step (`pipeline`).

May import: the core modules (`effpipe.config`, `errors`, `variants`, `run_dir`).
Nothing of the model, the outputs or the trainer: a pipeline returns a dataset.
"""
