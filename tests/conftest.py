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


@pytest.fixture
def repo_root():
    return REPO_ROOT
