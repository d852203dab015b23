"""A folder of real photographs for the input benchmarks, one JPEG file per image.

    python -m benchmarks.photo_folder --path=/tmp/photos --num_photos=2000
    python -m benchmarks.photo_folder --path=/tmp/photos --num_photos=8000 --with_test

Writes PATH/train/class_XX/photo_NNNNN.jpg (and, with --with_test, PATH/test/...):
the class-per-folder layout that Keras' image_dataset_from_directory reads.
Synthetic shapes or noise compress nothing like a photograph, so JPEG decoding times
measured on them mislead; every photo here is instead a distinct view of a real
photograph that matplotlib ships (grace_hopper.jpg, its one photograph: the other
sample images are logos and data): a random crop of 40-100% of the source's area,
at the output's aspect ratio, a random horizontal flip and a small brightness and
contrast change, resized to --width x --height and saved as a baseline JPEG at
--quality. At the defaults (500x375, quality 90) a file is about 50 KB, as a
downsized camera photo is.

Pillow (a dependency of matplotlib) crops, resizes and encodes; TensorFlow is not
imported. Each photo's randomness comes from (seed, split, index) alone, so the files
are the same for a seed whatever the thread count. A marker file, PATH/.photo_folder.json,
records the arguments; it says "complete" only once every photo is written, and a
second call with the same arguments finds it and returns at once.
"""

import concurrent.futures
import json
import os
import shutil
import time

import numpy as np
from absl import flags
from PIL import Image

from effpipe.errors import UsageError

MARKER_NAME = ".photo_folder.json"
# Raised when the way photos are made changes, so a folder from older code is remade.
FORMAT_VERSION = 1
# matplotlib's sample photographs; the other sample images are logos and data.
SOURCE_PHOTO_NAMES = ("grace_hopper.jpg",)
# The test split holds this fraction of the train split's count (at least one per class).
TEST_FRACTION = 0.1
# Crops cover this range of the largest crop that has the output's aspect ratio, by area.
CROP_AREA_RANGE = (0.4, 1.0)
# Contrast is scaled by up to +-15% about mid-grey; brightness moves by up to +-10%.
CONTRAST_RANGE = (0.85, 1.15)
BRIGHTNESS_RANGE = (-0.1, 0.1)
_SPLIT_IDS = {"train": 0, "test": 1}


def make_photo_folder(
    path: str,
    *,
    num_photos: int,
    num_classes: int = 10,
    width: int = 500,
    height: int = 375,
    quality: int = 90,
    seed: int = 0,
    with_test: bool = False,
) -> str:
    """Writes a class-per-folder tree of JPEG photos, unless it is already there.

    Photo i of a split goes to class i % num_classes, so the classes are balanced.
    Only train/, test/ and the marker file under `path` are ever removed or written.

    Args:
      path: the folder to fill; created when missing.
      num_photos: photos in the train split, at least num_classes.
      num_classes: class folders per split (class_00, class_01, ...).
      width: each photo's width in pixels.
      height: each photo's height in pixels.
      quality: the JPEG quality, 1 to 100.
      seed: the seed every crop, flip and colour change is drawn from.
      with_test: also write test/ with TEST_FRACTION as many photos (at least one
        per class).

    Returns:
      `path`.

    Raises:
      UsageError: an argument is out of range, or `path` already holds a train/ or
        test/ folder that this function did not make (it is never deleted).
    """
    arguments = _checked_arguments(
        num_photos=num_photos,
        num_classes=num_classes,
        width=width,
        height=height,
        quality=quality,
        seed=seed,
        with_test=with_test,
    )
    if is_complete(path, arguments):
        return path
    _clear(path)
    # An incomplete marker first: a run cut short leaves a folder known to be ours.
    _write_marker(path, arguments, complete=False)
    sources = [_load_source(name) for name in SOURCE_PHOTO_NAMES]
    jobs = [
        (split, index)
        for split, count in split_sizes(num_photos, num_classes, with_test).items()
        for index in range(count)
    ]
    for split in {split for split, _ in jobs}:
        for class_index in range(num_classes):
            os.makedirs(_class_folder(path, split, class_index, num_classes), exist_ok=True)

    def write(job):
        split, index = job
        photo = _make_photo(sources, arguments, split, index)
        class_folder = _class_folder(path, split, index % num_classes, num_classes)
        file_path = os.path.join(class_folder, f"photo_{index:05d}.jpg")
        photo.save(file_path, "JPEG", quality=quality, optimize=False, progressive=False)

    # Pillow releases the GIL while it resizes and encodes, so threads use every core.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in pool.map(write, jobs):
            pass
    _write_marker(path, arguments, complete=True)
    return path


def split_sizes(num_photos: int, num_classes: int, with_test: bool) -> dict[str, int]:
    """The photo count of each split that make_photo_folder writes.

    Args:
      num_photos: the train split's count.
      num_classes: class folders per split.
      with_test: whether a test split is written.

    Returns:
      {"train": num_photos} and, with with_test, "test": TEST_FRACTION of it, at
      least num_classes.
    """
    sizes = {"train": num_photos}
    if with_test:
        sizes["test"] = max(num_classes, round(num_photos * TEST_FRACTION))
    return sizes


def is_complete(path: str, arguments: dict) -> bool:
    """Whether `path` holds a finished folder made with exactly these arguments.

    Args:
      path: the folder.
      arguments: make_photo_folder's keyword arguments, without `path`.

    Returns:
      True when the marker says complete, with these arguments and this FORMAT_VERSION.
    """
    try:
        with open(os.path.join(path, MARKER_NAME)) as marker_file:
            marker = json.load(marker_file)
    except (OSError, ValueError):
        return False
    return marker == {"arguments": arguments, "complete": True, "version": FORMAT_VERSION}


def _checked_arguments(**arguments) -> dict:
    for name in ("num_photos", "num_classes", "width", "height"):
        if arguments[name] < 1:
            raise UsageError(f"{name}={arguments[name]} must be at least 1")
    if arguments["num_photos"] < arguments["num_classes"]:
        raise UsageError(
            f"num_photos={arguments['num_photos']} must be at least "
            f"num_classes={arguments['num_classes']}, so that no class folder is empty"
        )
    if not 1 <= arguments["quality"] <= 100:
        raise UsageError(f"quality={arguments['quality']} must be from 1 to 100")
    return arguments


def _clear(path: str) -> None:
    """Removes train/, test/ and the marker, refusing folders another tool made."""
    is_ours = os.path.exists(os.path.join(path, MARKER_NAME))
    for split in _SPLIT_IDS:
        split_path = os.path.join(path, split)
        if not os.path.exists(split_path):
            continue
        if not is_ours:
            raise UsageError(
                f"{split_path} exists and was not made by make_photo_folder "
                f"(no {MARKER_NAME}); pick an empty or new --path"
            )
        shutil.rmtree(split_path)
    if is_ours:
        os.remove(os.path.join(path, MARKER_NAME))


def _write_marker(path: str, arguments: dict, complete: bool) -> None:
    os.makedirs(path, exist_ok=True)
    marker = {"arguments": arguments, "complete": complete, "version": FORMAT_VERSION}
    with open(os.path.join(path, MARKER_NAME), "w") as marker_file:
        json.dump(marker, marker_file, indent=2, sort_keys=True)


def _class_folder(path: str, split: str, class_index: int, num_classes: int) -> str:
    digits = max(2, len(str(num_classes - 1)))
    return os.path.join(path, split, f"class_{class_index:0{digits}d}")


def _load_source(name: str) -> Image.Image:
    import matplotlib.cbook

    source = Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False))
    # Decoded once here, so the threads only read the pixels.
    source = source.convert("RGB")
    source.load()
    return source


def _make_photo(sources: list, arguments: dict, split: str, index: int) -> Image.Image:
    """One photo: a random crop, flip and colour change of a source, at the output size."""
    # Seeded by the photo's identity alone: the result does not depend on thread order.
    random = np.random.default_rng((arguments["seed"], _SPLIT_IDS[split], index))
    source = sources[random.integers(len(sources))]
    width, height = arguments["width"], arguments["height"]
    # The largest crop with the output's aspect ratio, then a random share of its area.
    largest_width = min(source.width, source.height * width / height)
    scale = np.sqrt(random.uniform(*CROP_AREA_RANGE))
    crop_width = largest_width * scale
    crop_height = crop_width * height / width
    left = random.uniform(0, source.width - crop_width)
    top = random.uniform(0, source.height - crop_height)
    box = (left, top, left + crop_width, top + crop_height)
    # Resizing from the box crops and resamples in one pass, at sub-pixel positions.
    photo = source.resize((width, height), Image.Resampling.BICUBIC, box=box)
    if random.uniform() < 0.5:
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    contrast = random.uniform(*CONTRAST_RANGE)
    brightness = random.uniform(*BRIGHTNESS_RANGE) * 255
    levels = np.arange(256, dtype=np.float64)
    table = np.clip(np.round((levels - 128) * contrast + 128 + brightness), 0, 255)
    # One lookup table for all three channels keeps the colour balance.
    return photo.point(table.astype(np.uint8).tolist() * 3)


def define_flags() -> None:
    """Defines the binary's flags. Only `python -m benchmarks.photo_folder` calls it, so
    a program that imports make_photo_folder gets none of them."""
    flags.DEFINE_string("path", None, "The folder to fill (train/, test/, the marker).")
    flags.DEFINE_integer("num_photos", 2000, "Photos in the train split.")
    flags.DEFINE_integer("num_classes", 10, "Class folders per split.")
    flags.DEFINE_integer("width", 500, "Each photo's width in pixels.")
    flags.DEFINE_integer("height", 375, "Each photo's height in pixels.")
    flags.DEFINE_integer("quality", 90, "JPEG quality, 1 to 100.")
    flags.DEFINE_bool("with_test", False, "Also write test/, 10% as many photos.")
    # --seed is the trainer's flag (effpipe.cli_flags, which run_main loads): one
    # definition, the same meaning of "the run's seed".
    from effpipe import cli_flags  # noqa: F401

    flags.declare_key_flag("seed")


def main(argv):
    del argv
    options = flags.FLAGS
    if not options.path:
        raise UsageError("--path is required: the folder to write the photos to")
    arguments = {
        name: options[name].value
        for name in ("num_photos", "num_classes", "width", "height", "quality", "seed")
    }
    arguments["with_test"] = options.with_test
    was_complete = is_complete(options.path, arguments)
    start = time.perf_counter()
    make_photo_folder(options.path, **arguments)
    seconds = time.perf_counter() - start
    file_sizes = [
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(options.path)
        for name in names
        if name.endswith(".jpg")
    ]
    mean_kb = sum(file_sizes) / len(file_sizes) / 1000
    action = "already complete" if was_complete else f"written in {seconds:.1f} s"
    print(
        f"photo_folder: {options.path}: {len(file_sizes)} photos "
        f"{arguments['width']}x{arguments['height']} at quality {arguments['quality']}, "
        f"mean {mean_kb:.1f} KB, {action}"
    )
    from benchmarks import harness

    harness.print_json_line(
        {
            "benchmark": "photo_folder",
            "path": options.path,
            "num_files": len(file_sizes),
            "mean_file_kb": mean_kb,
            "seconds": seconds,
            "reused": was_complete,
            **arguments,
        }
    )


if __name__ == "__main__":
    from benchmarks import harness

    define_flags()
    harness.run_main("benchmarks.photo_folder", main)
