"""Writing run outputs atomically: a temporary name in the same folder, then a rename.

A crash or a kill mid-write leaves the previous file or none, never half of one.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable

# Names of files being written; a killed writer can leave one behind.
TEMPORARY_PREFIX = ".tmp-"


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(temporary_path)`, then renames the result to `path`.

    Args:
      path: the final file path; its folder is created when missing.
      write: writes the whole file at the path it is given.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = "." + os.path.basename(path)  # Keeps extensions that writers check.
    handle, temporary_path = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=suffix)
    os.close(handle)
    try:
        write(temporary_path)
        os.replace(temporary_path, path)
    except BaseException:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)
        raise


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically."""

    def write(temporary_path):
        with open(temporary_path, "w", encoding="utf-8") as file:
            file.write(text)

    write_atomically(path, write)


def write_json(path: str, value) -> None:
    """Writes `value` as indented JSON, atomically."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def write_directory_atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(temporary_folder)`, then puts the folder in place of `path`.

    A crash while writing leaves the previous folder intact. The old folder is
    renamed aside before the new one takes its name and deleted after, so the
    window in which `path` is missing is two renames long.

    Args:
      path: the final folder path.
      write: fills the (empty, existing) folder it is given.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.abspath(path))
    temporary = tempfile.mkdtemp(dir=parent, prefix=f"{TEMPORARY_PREFIX}{name}-")
    try:
        write(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    previous = None
    if os.path.exists(path):
        previous = tempfile.mkdtemp(dir=parent, prefix=f"{TEMPORARY_PREFIX}{name}-old-")
        os.rmdir(previous)
        os.rename(path, previous)
    os.rename(temporary, path)
    if previous:
        shutil.rmtree(previous, ignore_errors=True)
