"""TrainConfig validation: every bad value is refused with a message naming it; the
config of an older run reads in today's terms; no import circle in effpipe."""

import ast
import pathlib

import pytest

import effpipe
from effpipe import config as config_lib
from effpipe.config import TrainConfig
from effpipe.errors import UsageError
from effpipe.training import feature_cache

PACKAGE_DIR = pathlib.Path(effpipe.__file__).parent


def test_defaults_are_valid_and_resolve_native_size():
    config = TrainConfig.from_flat()
    assert config.model.resolved_image_size == 224
    assert TrainConfig.from_flat(variant="b5").model.resolved_image_size == 456
    assert TrainConfig.from_flat(variant="b5", image_size=300).model.resolved_image_size == 300


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
        ({"lr_schedule": "step"}, "unknown lr_schedule 'step'"),
        ({"warmup_epochs": -1.0}, "--warmup_epochs=-1.0"),
        ({"warmup_epochs": 10.0}, "--warmup_epochs=10 must be shorter than each phase"),
        ({"lr_min_fraction": 1.0}, "--lr_min_fraction=1.0"),
        ({"lr_decay_rate": 0.0}, "--lr_decay_rate=0.0"),
        ({"lr_decay_epochs": 0.0}, "--lr_decay_epochs=0.0"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"optimizer": "sgd", "momentum": 1.0}, "--momentum=1.0"),
        ({"optimizer": "adamw", "weight_decay": -0.1}, "--weight_decay=-0.1"),
        ({"weight_decay": 0.05}, "--weight_decay=0.05 needs --optimizer=adamw"),
        ({"label_smoothing": 1.0}, "--label_smoothing=1.0"),
        ({"weights": "none", "stochastic_depth": 1.0}, "--stochastic_depth=1.0"),
        ({"stochastic_depth": 0.0}, "--stochastic_depth=0.0 applies to a base trained from"),
        ({"zero_init_residual": False}, "--nozero_init_residual applies to a base trained"),
    ],
)
def test_bad_values_raise_usage_error(overrides, fragment):
    with pytest.raises(UsageError, match=None) as raised:
        TrainConfig.from_flat(**overrides)
    assert fragment in str(raised.value)


@pytest.mark.parametrize(
    "augment, head, weights, expected",
    [
        (False, "pooled", "imagenet", True),
        (False, "pooled", "base.weights.h5", True),
        (False, "pooled", "none", False),
        (False, "keras", "imagenet", True),
        (False, "keras", "none", False),
        (True, "keras", "imagenet", False),
        (True, "pooled", "imagenet", False),
        (False, "notebook", "imagenet", False),
        (True, "notebook", "imagenet", False),
        (True, "pooled", "none", False),
        (False, "notebook", "none", False),
        (True, "notebook", "none", False),
    ],
)
def test_auto_feature_cache_needs_no_augmentation_a_pooled_head_and_a_pretrained_base(
    augment, head, weights, expected
):
    config = TrainConfig.from_flat(augment=augment, head=head, weights=weights)
    assert config.phases.phase1_feature_cache == "auto"
    assert feature_cache.resolve(config)[0] is expected
    # "off" always wins; "on" is taken wherever it is valid (a random base included).
    off = TrainConfig.from_flat(augment=augment, head=head, phase1_feature_cache="off")
    assert feature_cache.resolve(off)[0] is False
    if not augment and head in ("pooled", "keras"):
        on = TrainConfig.from_flat(
            augment=augment, head=head, weights=weights, phase1_feature_cache="on"
        )
        assert feature_cache.resolve(on)[0] is True


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (
            {"augment": True},
            ("--phase1_feature_cache=on needs phase 1 without augmentation", "--noaugment"),
        ),
        (
            {"augment": False, "head": "notebook"},
            ("--phase1_feature_cache=on needs --head=pooled", "pass --head=pooled"),
        ),
        ({"augment": True, "head": "notebook"}, ("without augmentation",)),
    ],
)
def test_a_feature_cache_forced_on_where_it_cannot_apply_is_refused(overrides, fragments):
    with pytest.raises(UsageError) as raised:
        TrainConfig.from_flat(phase1_feature_cache="on", **overrides)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_the_notebook_head_is_also_accepted_by_its_older_name_seed():
    assert TrainConfig.from_flat(head="seed").model.head == "notebook"
    assert TrainConfig.from_flat(head="seed") == TrainConfig.from_flat(head="notebook")


def test_an_unknown_feature_cache_mode_is_refused():
    with pytest.raises(UsageError, match="unknown phase1_feature_cache 'yes'"):
        TrainConfig.from_flat(phase1_feature_cache="yes")


def _effpipe_imports(path) -> set[str]:
    """The effpipe modules a file imports, at any depth (TYPE_CHECKING blocks included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("effpipe.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("effpipe"):
            for alias in node.names:
                module = f"{node.module}.{alias.name}"
                found.add(module if _module_path(module) else node.module)
    return found


def _module_path(module: str):
    base = PACKAGE_DIR.parent.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def test_no_effpipe_module_imports_one_that_imports_it_back():
    graph = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[module] = {name for name in _effpipe_imports(path) if name != "effpipe"}

    def reaches(start, goal, seen):
        for name in graph.get(start, ()):
            if name == goal or (name not in seen and reaches(name, goal, seen | {name})):
                return True
        return False

    circles = sorted(
        f"{module} <-> {imported}"
        for module, imported_modules in graph.items()
        for imported in imported_modules
        if reaches(imported, module, {imported})
    )
    assert circles == []


def test_a_config_an_older_effpipe_recorded_reads_in_todays_terms():
    older = {"head": "seed", "dataset": "cifar100", "source_size": 32, "weights": "imagenet"}
    upgraded = config_lib.upgrade_recorded(older)
    assert (upgraded["head"], upgraded["source_size"], upgraded["cache"]) == ("notebook", 0, "auto")
    assert upgraded["lr_schedule"] == "constant" and upgraded["zero_init_residual"] is True
    assert older["head"] == "seed"  # The recorded dict is left as it was.
