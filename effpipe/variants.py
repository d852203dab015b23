"""The EfficientNet variants as data: Keras constructor name and native resolution.

This module imports neither TensorFlow nor Keras, so flag parsing and config
validation stay fast; `effpipe.model.efficientnet` turns a row into a Keras model.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the variant table.

    Attributes:
      keras_constructor: name of the constructor in `keras.applications`.
      native_image_size: the resolution in pixels the variant was trained at
        (EfficientNet paper; Keras `default_size`).
    """

    keras_constructor: str
    native_image_size: int


VARIANTS = {
    "b0": Variant("EfficientNetB0", 224),
    "b1": Variant("EfficientNetB1", 240),
    "b2": Variant("EfficientNetB2", 260),
    "b3": Variant("EfficientNetB3", 300),
    "b4": Variant("EfficientNetB4", 380),
    "b5": Variant("EfficientNetB5", 456),
    "b6": Variant("EfficientNetB6", 528),
    "b7": Variant("EfficientNetB7", 600),
}

# Keras EfficientNets without their top refuse inputs smaller than 32 pixels.
MIN_IMAGE_SIZE = 32
