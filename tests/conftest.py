"""Shared test set-up: quiet TensorFlow, parsed absl flags, the repo root."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest
from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Under pytest absl flags are never parsed; mark them so reading defaults works.
    # Tests that change flags use absl.testing.flagsaver.
    flags.FLAGS.mark_as_parsed()


# The files that take longest, longest first (seconds of work each in WORKSPACE's
# suite-time table). `make test` runs whole files on two processes (--dist loadfile)
# in collection order: starting the long files first keeps one process from being
# handed a long file at the end while the other has finished.
SLOWEST_FILES_FIRST = (
    "test_demo.py",
    "test_train.py",
    "test_distribution.py",
    "test_resume.py",
    "test_gpu_check.py",
    "test_feature_cache.py",
    "test_tune_batch.py",
    "test_export.py",
    "test_bad_input.py",
    "test_data_service.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return (
            SLOWEST_FILES_FIRST.index(name)
            if name in SLOWEST_FILES_FIRST
            else len(SLOWEST_FILES_FIRST)
        )

    # A stable sort: the tests of a file keep their order, and so do the other files.
    items.sort(key=rank)


@pytest.fixture
def repo_root():
    return REPO_ROOT
