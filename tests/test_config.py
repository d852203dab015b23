"""TrainConfig validation: every bad value is refused with a message naming it."""

import pytest

from effpipe.config import TrainConfig
from effpipe.errors import UsageError


def test_defaults_are_valid_and_resolve_native_size():
    config = TrainConfig()
    assert config.resolved_image_size == 224
    assert TrainConfig(variant="b5").resolved_image_size == 456
    assert TrainConfig(variant="b5", image_size=300).resolved_image_size == 300


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"variant": "b9"}, "unknown variant 'b9'"),
        ({"image_size": 16}, "--image_size=16"),
        ({"image_size": 5000}, "--image_size=5000"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"dataset": "folder:"}, "unknown dataset 'folder:'"),
        ({"validation_fraction": 0.0}, "--validation_fraction=0.0"),
        ({"validation_fraction": 1.0}, "--validation_fraction=1.0"),
        ({"batch_size": 0}, "--batch_size=0"),
        ({"phase1_epochs": -1}, "--phase1_epochs=-1"),
        ({"phase2_epochs": -3}, "--phase2_epochs=-3"),
        ({"phase2_learning_rate": 0.0}, "--phase2_learning_rate=0.0"),
        ({"unfreeze_blocks": -1}, "--unfreeze_blocks=-1"),
        ({"head": "dense"}, "unknown head 'dense'"),
        ({"dropout": 1.0}, "--dropout=1.0"),
        ({"xla": "maybe"}, "unknown xla mode 'maybe'"),
        ({"shapes_num_classes": 11}, "--shapes_num_classes=11"),
    ],
)
def test_bad_values_raise_usage_error(overrides, fragment):
    with pytest.raises(UsageError, match=None) as raised:
        TrainConfig(**overrides)
    assert fragment in str(raised.value)
