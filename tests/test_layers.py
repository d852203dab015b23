"""The layer packages: no module imports from a layer above its own.

The order, as the data flows: core (config, config_checks, errors, faults, network, variants, run_dir) <- data <-
model <- outputs <- training <- tune <- the binaries (train, evaluate, predict,
tune_batch, data_service, cli_flags). A module may import its own layer and any
below it.
"""

import ast
import pathlib

import effpipe

PACKAGE_DIR = pathlib.Path(effpipe.__file__).parent
LAYERS = {
    **dict.fromkeys(
        ("config", "config_checks", "errors", "faults", "network", "variants", "run_dir"), 0
    ),
    "data": 1,
    "model": 2,
    "outputs": 3,
    "training": 4,
    "tune": 5,
}
BINARY_LAYER = 6


def _layer(module: str) -> int:
    """The layer of `effpipe.X...`: its top-level package or core module, else a binary."""
    return LAYERS.get(module.split(".")[1], BINARY_LAYER)


def _imported_modules(path: pathlib.Path) -> list[str]:
    """Every effpipe module `path` imports, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("effpipe.")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("effpipe"):
            if (
                node.module == "effpipe"
                or node.module.count(".") == 1
                and (
                    node.module.split(".")[1] in LAYERS
                    and not (PACKAGE_DIR / f"{node.module.split('.')[1]}.py").exists()
                )
            ):
                # `from effpipe import x` and `from effpipe.pkg import module`.
                found += [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
    return found


def _modules():
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            yield ".".join(parts), path


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [
        f"{module} imports {imported}"
        for module, path in _modules()
        for imported in _imported_modules(path)
        if imported.count(".") >= 1 and _layer(imported) > _layer(module)
    ]
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    # A data module that imported the trainer would be caught.
    bad = tmp_path / "bad.py"
    bad.write_text("from effpipe.training import trainer\nimport effpipe.tune.tuner\n")
    assert [_layer(name) for name in _imported_modules(bad)] == [4, 5]
    assert _layer("effpipe.data.sources") == 1


def test_every_layer_package_says_what_it_owns_and_may_import():
    for package in ("data", "model", "outputs", "training", "tune"):
        docstring = ast.get_docstring(
            ast.parse((PACKAGE_DIR / package / "__init__.py").read_text())
        )
        assert docstring and "May import" in docstring and "Owns" in docstring, package
