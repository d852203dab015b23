"""Image files of every kind a user's photo folder holds, for the tests to write.

Each `write_*` function writes one file (creating its folders) and returns its path.
The pictures share one layout, so a test can check what a decoder returned:

    top three quarters   the solid `color` (RED by default)
    bottom quarter       a grey ramp, black at the left edge to white at the right

JPEG moves flat colours by a level or two and blurs the border between the parts:
compare the top half's mean with `color` to within a few levels (PNG, GIF and BMP
decode exactly). The ramp tells a flipped or sideways decode from a right one.

Beside the good files are the bad ones a real folder holds: a truncated JPEG, an
empty file, text named .jpg, PNG bytes named .jpg. `write_class_folder_tree` builds
root/<split>/<class>/<file> trees, each class in its own colour (CLASS_COLORS, in
the alphabetical order labels follow), with a hidden `.ipynb_checkpoints/` folder.

Writers' docstrings say what TensorFlow 2.21 does with each kind. A helper module,
not a test file: tests import it (`import image_files`; pytest puts tests/ on
the path).
"""

import inspect
import io
import os
import pathlib

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
# Class i of a tree is drawn in CLASS_COLORS[i % len(CLASS_COLORS)]: far apart in RGB
# and in luma, so even a grey decode tells the classes apart.
CLASS_COLORS = (RED, GREEN, BLUE, (255, 255, 0), (255, 0, 255), (0, 255, 255))
# Pillow's RGB-to-L conversion (ITU-R 601-2 luma): what a grayscale file stores.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
DEFAULT_WIDTH = 64
DEFAULT_HEIGHT = 48


def picture(width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT, color=RED) -> np.ndarray:
    """The shared layout as a uint8 RGB array: `color` above, a grey ramp below.

    Args:
      width: pixels across, at least 2.
      height: pixels down, at least 4 (the ramp is the bottom quarter).
      color: the (R, G, B) of the top three quarters.

    Returns:
      A (height, width, 3) uint8 array.
    """
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = color
    ramp = np.round(np.linspace(0, 255, width)).astype(np.uint8)
    pixels[height - height // 4 :] = ramp[None, :, None]
    return pixels


def luma(color) -> int:
    """The grey level, 0 to 255, a grayscale file stores for the (R, G, B) `color`:
    76 for RED, 150 for GREEN, 29 for BLUE (Pillow's conversion)."""
    return int(sum(weight * value for weight, value in zip(LUMA_WEIGHTS, color)) + 0.5)


def _image(width: int, height: int, color) -> Image.Image:
    return Image.fromarray(picture(width, height, color), "RGB")


def _write_bytes(path, data: bytes) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _write_image(path, image: Image.Image, image_format: str, **options) -> pathlib.Path:
    return _write_bytes(path, _encoded(image, image_format, **options))


def write_jpeg(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED, quality=95):
    """A baseline RGB JPEG, 4:2:0 chroma (Pillow's default). Decodes to the shared
    layout, the top half's mean within 2 levels of `color` (254, 0, 0 for RED).

    Args:
      path: the file to write.
      width, height, color: the picture's, as picture() takes them.
      quality: the JPEG quality, 1 to 100.

    Returns:
      The path written, as a pathlib.Path.
    """
    return _write_image(path, _image(width, height, color), "JPEG", quality=quality)


def write_progressive_jpeg(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """A progressive RGB JPEG, as web downloads often are; decodes as write_jpeg's.

    Args:
      path: the file to write.
      width, height, color: the picture's, as picture() takes them.

    Returns:
      The path written.
    """
    return _write_image(path, _image(width, height, color), "JPEG", quality=95, progressive=True)


def write_grayscale_jpeg(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """A one-channel JPEG. Decoded with channels=3 the top half is luma(color) in all
    three channels (76 for RED); with channels=0 it has one channel.

    Args:
      path: the file to write.
      width, height, color: the picture's (`color` is stored as its luma).

    Returns:
      The path written.
    """
    return _write_image(path, _image(width, height, color).convert("L"), "JPEG", quality=95)


def write_cmyk_jpeg(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """A CMYK JPEG, as print workflows and some stock photos save: Pillow stores
    Adobe-style inverted CMYK (C = 255 - R, ..., K = 0) with an Adobe marker.
    TensorFlow decodes it with channels=3 or 0 to the right colours (exactly `color`
    on top, not inverted) but raises InvalidArgumentError with channels=1
    ("Unsupported color conversion request") and 4 ("JPEG does not support 4 channels").

    Args:
      path: the file to write.
      width, height, color: the picture's, as picture() takes them.

    Returns:
      The path written.
    """
    return _write_image(path, _image(width, height, color).convert("CMYK"), "JPEG", quality=95)


def write_exif_rotated_jpeg(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """A phone camera's JPEG: the layout stored turned 90 degrees counter-clockwise,
    with EXIF Orientation 6 telling viewers to turn it back. TensorFlow ignores EXIF:
    it returns the stored, sideways pixels, shape (width, height, 3).

    Args:
      path: the file to write.
      width, height, color: the upright picture's, as picture() takes them.

    Returns:
      The path written.
    """
    stored = _image(width, height, color).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _write_image(path, stored, "JPEG", quality=95, exif=exif.tobytes())


def write_truncated_jpeg(path, width=256, height=192, color=RED):
    """A baseline JPEG cut to half its bytes (an interrupted copy): the header whole.

    tf.io.is_jpeg is True and extract_jpeg_shape gives the full size, but
    decode_image and decode_jpeg raise InvalidArgumentError "jpeg::Uncompress
    failed. Invalid JPEG data or crop window." decode_jpeg with
    try_recover_truncated=True returns the rows present and grey (128) below.
    decode_and_crop_jpeg succeeds for a window well inside the rows present.

    Args:
      path: the file to write.
      width, height, color: the whole picture's; large enough to cut the scan data.

    Returns:
      The path written.
    """
    data = _encoded(_image(width, height, color), "JPEG", quality=95)
    return _write_bytes(path, data[: len(data) // 2])


def write_png_rgb(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """An 8-bit RGB PNG. Lossless: decodes to exactly picture(width, height, color).

    Args:
      path: the file to write.
      width, height, color: the picture's, as picture() takes them.

    Returns:
      The path written.
    """
    return _write_image(path, _image(width, height, color), "PNG")


def write_png_rgba(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """An 8-bit RGBA PNG: `color` opaque, the ramp fully transparent (alpha 0). With
    channels=3 it decodes to exactly picture(...): alpha is dropped, not composited,
    so transparent pixels keep their stored grey.

    Args:
      path: the file to write.
      width, height, color: the picture's, as picture() takes them.

    Returns:
      The path written.
    """
    alpha = np.full((height, width, 1), 255, np.uint8)
    alpha[height - height // 4 :] = 0
    pixels = np.concatenate([picture(width, height, color), alpha], axis=-1)
    return _write_image(path, Image.fromarray(pixels, "RGBA"), "PNG")


def write_png_palette(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """A palette (indexed, mode P) PNG. Up to 255 pixels wide the ramp's greys and
    `color` fit the 256-entry palette, so it decodes to exactly picture(...).

    Args:
      path: the file to write.
      width, height, color: the picture's; wider than 255 the ramp is quantised.

    Returns:
      The path written.
    """
    image = _image(width, height, color).convert("P", palette=Image.Palette.ADAPTIVE)
    return _write_image(path, image, "PNG")


def write_png_grayscale(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """An 8-bit one-channel PNG. Decoded with channels=3 the top three quarters are
    exactly luma(color) in every channel (76 for RED); the ramp is exact.

    Args:
      path: the file to write.
      width, height, color: the picture's (`color` is stored as its luma).

    Returns:
      The path written.
    """
    return _write_image(path, _image(width, height, color).convert("L"), "PNG")


def write_gif(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED, second_color=BLUE):
    """A two-frame animated GIF: frame one in `color`, frame two in `second_color`.

    decode_image(expand_animations=False) returns the first frame, 3-D, exactly
    picture(...) (the palette holds `color` and the ramp up to 255 pixels wide);
    with expand_animations=True (its default) it returns both, (2, height, width, 3).
    decode_jpeg raises InvalidArgumentError "Got 2 frames, but animated gifs can
    only be decoded by tf.io.decode_gif or tf.io.decode_image".

    Args:
      path: the file to write.
      width, height, color: the first frame's, as picture() takes them.
      second_color: the second frame's colour.

    Returns:
      The path written.
    """
    frames = [
        _image(width, height, frame_color).convert("P", palette=Image.Palette.ADAPTIVE)
        for frame_color in (color, second_color)
    ]
    return _write_image(
        path, frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100
    )


def write_bmp(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """A 24-bit uncompressed BMP. decode_image returns exactly picture(...);
    decode_jpeg raises InvalidArgumentError ("Trying to decode BMP format using a
    wrong op").

    Args:
      path: the file to write.
      width, height, color: the picture's, as picture() takes them.

    Returns:
      The path written.
    """
    return _write_image(path, _image(width, height, color), "BMP")


def write_webp(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """A lossless WebP. decode_image(expand_animations=False) returns exactly
    picture(...). decode_jpeg and decode_and_crop_jpeg do not raise but return a
    4-D (1, height, width, 3) tensor (uncropped) though their static shape is 3-D,
    so a resize after them fails. Keras' image_dataset_from_directory skips .webp.

    Args:
      path: the file to write.
      width, height, color: the picture's, as picture() takes them.

    Returns:
      The path written.
    """
    return _write_image(path, _image(width, height, color), "WEBP", lossless=True)


def write_empty_file(path):
    """A zero-byte file (a failed download or copy). Every decoder raises
    InvalidArgumentError "Input is empty."; tf.io.is_jpeg is False.

    Args:
      path: the file to write.

    Returns:
      The path written.
    """
    return _write_bytes(path, b"")


def write_text_as_jpg(path, text="This is not an image.\n"):
    """A text file under an image's name. Every decoder raises InvalidArgumentError
    "Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required."

    Args:
      path: the file to write.
      text: its contents.

    Returns:
      The path written.
    """
    return _write_bytes(path, text.encode())


def write_png_named_jpg(path, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, color=RED):
    """PNG bytes under a .jpg name, as renamed downloads are. decode_image and
    decode_jpeg both go by the bytes: exactly picture(...). tf.io.is_jpeg is False,
    and decode_and_crop_jpeg raises InvalidArgumentError ("can run on JPEG only").

    Args:
      path: the file to write (the caller names it .jpg).
      width, height, color: the picture's, as picture() takes them.

    Returns:
      The path written.
    """
    return write_png_rgb(path, width, height, color)


# The writer a tree uses for a file name's lower-cased extension; other names
# (.DS_Store, Thumbs.db, notes.txt) get text, as the stray files of a real folder.
WRITERS_BY_EXTENSION = {
    ".jpg": write_jpeg,
    ".jpeg": write_jpeg,
    ".png": write_png_rgb,
    ".gif": write_gif,
    ".bmp": write_bmp,
    ".webp": write_webp,
}


def write_class_folder_tree(root, layout, hidden_folder: str | None = ".ipynb_checkpoints"):
    """Writes root/<split>/<class>/<file> for every file the layout names.

    The i-th class name of a split, sorted (the label order), is drawn in
    CLASS_COLORS[i % len(CLASS_COLORS)]. A file entry is a name, written by
    WRITERS_BY_EXTENSION for its extension (text for any other), or a (name,
    writer) pair such as ("cut.jpg", write_truncated_jpeg). Keras'
    image_dataset_from_directory skips hidden folders beside the classes but takes
    images in hidden folders inside a class folder as that class's.

    Args:
      root: the folder to write under.
      layout: {split: {class name: [file entry, ...]}}, e.g.
        {"train": {"cats": ["a.jpg", "b.png"], "dogs": ["c.jpg"]}}.
      hidden_folder: a folder beside the class folders of every split, holding one
        JPEG, as Jupyter leaves `.ipynb_checkpoints/`: a reader must not take it
        for a class. None for none.

    Returns:
      {path written: the colour it was drawn in, None for stray files and the
      hidden folder's}.
    """
    root = pathlib.Path(root)
    written = {}
    for split, classes in layout.items():
        for class_index, class_name in enumerate(sorted(classes)):
            color = CLASS_COLORS[class_index % len(CLASS_COLORS)]
            for entry in classes[class_name]:
                name, writer = entry if isinstance(entry, tuple) else (entry, None)
                written.update(_write_entry(root / split / class_name / name, writer, color))
        if hidden_folder is not None:
            written[write_jpeg(root / split / hidden_folder / "photo-checkpoint.jpg")] = None
    return written


def _write_entry(path: pathlib.Path, writer, color) -> dict:
    """Writes one tree entry; returns {path: colour, or None for a colourless file}."""
    if writer is None:
        writer = WRITERS_BY_EXTENSION.get(os.path.splitext(path.name)[1].lower())
    if writer is None:
        return {write_text_as_jpg(path): None}
    # Writers of colourless files (empty, text) take only the path.
    if "color" not in inspect.signature(writer).parameters:
        return {writer(path): None}
    return {writer(path, color=color): color}
