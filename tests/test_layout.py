"""The tree shows the design: packages by role, imports one way, every package saying what it owns.

Read from the source (ast), not by importing, so a lazy import inside a
function counts as much as one at the top.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Each layer may import itself and the layers before it, never one after it.
LAYERS = ("ferpipe.errors", "ferpipe.console", "ferpipe.data", "ferpipe.preprocess", "ferpipe.model",
          "ferpipe.evaluate", "ferpipe.crossval", "ferpipe.serving")
BESIDE = {"ferpipe.demo": {"ferpipe.errors", "ferpipe.console", "ferpipe.data"}}  # not on any stage's path
OUTSIDE_LIBRARY = ("kfp", "components", "pipelines")


def modules(top: str):
    for path in sorted((REPO / top).rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        yield name, path


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def package_of(module: str) -> str | None:
    for package in (*LAYERS, *BESIDE, "ferpipe"):
        if module == package or module.startswith(package + "."):
            return package
    return None


def allowed(package: str) -> set[str]:
    if package in BESIDE:
        return BESIDE[package] | {package}
    return set(LAYERS[: LAYERS.index(package) + 1])


@pytest.mark.parametrize("name,path", list(modules("ferpipe")), ids=lambda v: str(v).rsplit("/", 1)[-1])
def test_ferpipe_imports_run_one_way(name, path):
    own = package_of(name)
    for target in imported(path):
        top = target.split(".")[0]
        assert top not in OUTSIDE_LIBRARY, f"{name} imports {target}: the library never imports kfp or the DAG"
        if top != "ferpipe" or own == "ferpipe":
            continue
        other = package_of(target)
        if other == "ferpipe":  # `from ferpipe import __version__`
            continue
        assert other in allowed(own), f"{name} ({own}) imports {target} ({other}): against the arrow"


def test_components_never_import_the_dag():
    for name, path in modules("components"):
        assert not [t for t in imported(path) if t.split(".")[0] == "pipelines"], name


def test_every_package_says_what_it_owns():
    for init in sorted((REPO / "ferpipe").rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 60, f"{init.relative_to(REPO)} needs a docstring saying what it owns"


def test_no_module_sits_loose_at_the_top_of_ferpipe():
    loose = {p.stem for p in (REPO / "ferpipe").glob("*.py")}
    assert loose == {"__init__", "errors", "console", "version"}, loose


def test_the_checker_sees_a_wrong_way_import(tmp_path):
    """The rule above must be able to fail: a data module importing the model is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ferpipe.model.training import train_member\n")
    own, targets = package_of("ferpipe.data.bad"), imported(bad)
    assert any(package_of(t) not in allowed(own) for t in targets if t.startswith("ferpipe."))
