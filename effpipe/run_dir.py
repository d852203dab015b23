"""The run directory: a new run, the same run resumed, or another run's (refused).

A run directory holds `config.json`, the resolved TrainConfig that made it. Starting
a run there again with the same configuration resumes it (or, when metrics.json
says it finished, reports it complete); with another configuration it is refused,
naming the flags that differ, unless --overwrite discards the old run's outputs.
An unfinished run may resume with other values of `config.RESUMABLE_CHANGES` (a
lower learning rate after a NaN loss; thread counts): config.json takes them. A
config.json an older effpipe wrote reads in today's terms (`config.upgrade_recorded`).
No TensorFlow import: the check runs before TensorFlow loads.

One run at a time: `hold` takes an OS lock on a file in the directory before
anything is written and keeps it until the process ends, so a second run on the
same directory stops at once, naming the holder. The kernel releases the lock when
its holder dies, SIGKILL included: no stale lock.

Every output is written atomically: a temporary name in the same folder, then a
rename, so a crash or a kill mid-write leaves the previous file or none, never half
of one. A write that finds the disk full removes its temporary and raises one
`DiskFullError` line naming the file, the space it needs and the space free; the
previous file stays. The tests make a chosen write find the disk full by naming it
in DISK_FULL_ENV, or kill the process inside it (effpipe.faults).
"""

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable

from absl import logging

from effpipe import config as config_lib
from effpipe import faults
from effpipe.config import RESUMABLE_CHANGES, TrainConfig
from effpipe.errors import DiskFullError, UsageError, is_disk_full

CONFIG_FILE = "config.json"
# Phase 1's pooled features (effpipe.training.feature_cache): a run's output.
FEATURE_CACHE_FILE = os.path.join("cache", "phase1_features.npz")
# The decoded-image caches of a run without --cache_dir (effpipe.data.cache). Not a
# run output: each is keyed by the files it holds and valid for any run over them,
# and every worker of a multi-worker run shares it, so a new run keeps it (a run
# killed before its first epoch resumes its first pass) and so does --overwrite.
IMAGE_CACHE_DIR = os.path.join("cache", "images")


def find_export(model: str) -> str:
    """The SavedModel folder of --model: `model`/export, or `model` itself (absolute).

    Raises:
      UsageError: neither holds a saved_model.pb.
    """
    for candidate in (os.path.join(model, "export"), model):
        if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
            return os.path.abspath(candidate)
    raise UsageError(
        f"{model} holds no exported model (no saved_model.pb in it or in its export/): "
        "point --model at a finished run's directory"
    )


def image_cache_root(workdir: str, cache_dir: str) -> str:
    """The folder of the decoded-image caches: --cache_dir, else WORKDIR/cache/images
    (for every worker of a run, and for `effpipe.evaluate` on the run's folder)."""
    return cache_dir or os.path.join(workdir, IMAGE_CACHE_DIR)


# Everything a run writes; --overwrite removes exactly these, nothing else.
RUN_OUTPUTS = (
    CONFIG_FILE,
    "flags.txt",
    "history.json",
    "history.png",
    "metrics.json",
    "checkpoints",
    "state",
    FEATURE_CACHE_FILE,
    "tensorboard",
    "export",
    "predictions.png",
    "per_class.png",
    "augmentations.png",
    "evaluation",
)


NEW, RESUME, COMPLETE = "new", "resume", "complete"
# The lock file `hold` takes; not a run output (--overwrite leaves it).
LOCK_FILE = ".effpipe.lock"
# The open lock files of this process: closing one would release its lock.
_HELD_LOCKS = {}


def hold(workdir: str) -> None:
    """Takes the run directory's lock for the rest of this process (creating the
    directory when missing), or refuses a directory another run holds.

    `fcntl.flock` on WORKDIR/.effpipe.lock: the kernel drops it when the holder
    exits or is killed, so a crashed run never leaves a lock behind. A second call
    for the same directory in the same process keeps the lock it holds.

    Raises:
      UsageError: another process holds the lock (its PID and host are named), or
        the directory cannot be created.
    """
    create(workdir)
    path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
    if path in _HELD_LOCKS:
        return
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "an unknown process"
        lock.close()
        raise UsageError(
            f"--workdir={workdir} is in use by another effpipe run ({holder}): wait for "
            "it to end, or pick another --workdir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    _HELD_LOCKS[path] = lock


def prepare(workdir: str, config: TrainConfig, *, overwrite: bool) -> str:
    """Checks `workdir` against `config` and records the config for a new run.

    Args:
      workdir: the run directory (created when missing).
      config: this run's configuration.
      overwrite: discard another run's outputs instead of refusing them.

    Returns:
      NEW (also when an earlier run there ended before its first epoch), RESUME
      (same configuration, or one differing in RESUMABLE_CHANGES only, not
      finished) or COMPLETE (same configuration,
      metrics.json written). Half-written files a killed run left are deleted.

    Raises:
      UsageError: the directory holds another run, or files of no effpipe run,
        and `overwrite` is off.
    """
    create(workdir)
    wanted = config.to_flat()
    config_path = os.path.join(workdir, CONFIG_FILE)
    present = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(workdir, name))]
    remove_temporaries(workdir)
    # A run that failed before its first epoch left nothing worth keeping: a rerun
    # with corrected flags starts afresh without --overwrite.
    holds_work = any(name in present for name in ("state", "checkpoints", "metrics.json"))
    if os.path.exists(config_path) and not overwrite and holds_work:
        recorded = _read_config(config_path)
        finished = os.path.exists(os.path.join(workdir, "metrics.json"))
        changed = sorted(
            name
            for name in wanted.keys() | recorded.keys()
            if recorded.get(name) != wanted.get(name)
        )
        if not changed:
            return COMPLETE if finished else RESUME
        if not finished and set(changed) <= set(RESUMABLE_CHANGES):
            logging.info(
                "resuming with changed flags: %s",
                ", ".join(f"--{n}={wanted[n]!r} (was {recorded.get(n)!r})" for n in changed),
            )
            write_json(config_path, wanted)
            return RESUME
        details = ", ".join(
            f"--{name}: {recorded.get(name)!r} there, {wanted.get(name)!r} now"
            for name in changed[:4]
        )
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UsageError(
            f"{workdir} holds a run with other flags ({details}{more}): rerun with the same "
            "flags to resume it, pick another --workdir, or pass --overwrite to discard it"
        )
    if present and not overwrite and not os.path.exists(config_path):
        raise UsageError(
            f"{workdir} holds outputs of a run without its {CONFIG_FILE} ({', '.join(present)}): "
            "pick another --workdir, or pass --overwrite to discard them"
        )
    for name in present:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    write_json(config_path, wanted)
    return NEW


def create(workdir: str) -> None:
    """Creates the run directory (and its parents) when missing.

    Raises:
      UsageError: it cannot be created: a file in its place or on its path, no
        permission, a read-only filesystem.
    """
    make_directory(workdir, "workdir")


def make_directory(path: str, flag_name: str) -> None:
    """Creates the folder a flag names (and its parents) when missing.

    Raises:
      UsageError: one line naming --FLAG_NAME=PATH, when it cannot be created.
    """
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"--{flag_name}={path} cannot be created ({error.strerror or error}"
            f"{': ' + error.filename if error.filename else ''}): pick a directory path "
            "you can write to"
        ) from error


def is_complete(workdir: str, config: TrainConfig) -> bool:
    """Whether `workdir` holds this configuration's finished run; reads, writes nothing.

    For the workers of a multi-worker run other than the chief, which alone
    prepares the directory.
    """
    config_path = os.path.join(workdir, CONFIG_FILE)
    return (
        os.path.exists(os.path.join(workdir, "metrics.json"))
        and os.path.exists(config_path)
        and _read_config(config_path) == config.to_flat()
    )


def _read_config(path: str) -> dict:
    """config.json's flat flags, in today's terms (an older run's included)."""
    return config_lib.upgrade_recorded(read_json(path))


def remove_temporaries(workdir: str) -> None:
    """Deletes half-written files and folders a killed run left (`.tmp-*` names)."""
    folders = [
        workdir,
        *(os.path.join(workdir, name) for name in ("state", "checkpoints", "cache")),
    ]
    for folder in folders:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(TEMPORARY_PREFIX):
                    path = os.path.join(folder, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)


# Names of files being written; a killed writer can leave one behind.
TEMPORARY_PREFIX = ".tmp-"


# Fault injection for the tests: a write whose file or folder name contains this
# variable's value writes in full, then fails as a full disk would (ENOSPC).
DISK_FULL_ENV = "EFFPIPE_TEST_DISK_FULL"


def _with_injected_disk_full(path: str, write: Callable[[str], None]) -> Callable[[str], None]:
    name = os.environ.get(DISK_FULL_ENV)
    if not name or name not in os.path.basename(os.path.abspath(path)):
        return write

    def write_then_fail(temporary_path):
        write(temporary_path)
        raise OSError(errno.ENOSPC, f"No space left on device ({DISK_FULL_ENV})", temporary_path)

    return write_then_fail


def _bytes_in(path: str) -> int:
    """The bytes of a file, or of every file under a folder; 0 when it is missing."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, name)) for name in names)
    return total


def disk_full_error(path: str, needed_bytes: int, *, at_least: bool, kept: str) -> DiskFullError:
    """One line for a write to `path` that found its disk full.

    Args:
      path: the file or folder being written.
      needed_bytes: the space the write needs (at least that much, with `at_least`).
      at_least: whether `needed_bytes` is a lower bound (what was written before the
        disk filled) rather than an estimate of the whole.
      kept: what is still intact, as a sentence.
    """
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    needed = f"{'at least ' if at_least else 'about '}{needed_bytes / 2**20:.1f} MB"
    return DiskFullError(
        f"no space left on the disk of {path}: writing it needs {needed}, and "
        f"{free / 2**20:.1f} MB are free there. Free some space (or give the run another "
        f"disk) and rerun the same command. {kept}"
    )


def _raise_if_disk_full(error: BaseException, path: str, partial: str) -> None:
    """Raises a DiskFullError for `path` when `error` is a full disk; `partial` is
    the temporary the write had reached (its size is a lower bound of the need)."""
    if not is_disk_full(error):
        return
    written, previous = _bytes_in(partial), _bytes_in(path) if os.path.exists(path) else 0
    kept = (
        f"The previous {os.path.basename(path)} is intact."
        if os.path.exists(path)
        else "Nothing half-written is left."
    )
    raise disk_full_error(
        path, max(written, previous), at_least=previous <= written, kept=kept
    ) from error


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(temporary_path)`, then renames the result to `path`.

    Args:
      path: the final file path; its folder is created when missing.
      write: writes the whole file at the path it is given.

    Raises:
      DiskFullError: the disk filled up; `path` is as it was before.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = "." + os.path.basename(path)  # Keeps extensions that writers check.
    handle, temporary_path = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=suffix)
    os.close(handle)
    try:
        _with_injected_disk_full(path, write)(temporary_path)
        faults.kill_during_write(path)
        os.replace(temporary_path, path)
    except BaseException as error:
        try:
            _raise_if_disk_full(error, path, temporary_path)
        finally:
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

    Raises:
      DiskFullError: the disk filled up; the previous folder (if any) is intact.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.abspath(path))
    temporary = tempfile.mkdtemp(dir=parent, prefix=f"{TEMPORARY_PREFIX}{name}-")
    try:
        _with_injected_disk_full(path, write)(temporary)
        faults.kill_during_write(path)
    except BaseException as error:
        try:
            _raise_if_disk_full(error, path, temporary)
        finally:
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
