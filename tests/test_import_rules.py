"""The import rules of docs/architecture.md, read from the source with ``ast`` (nothing is imported)."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
STAGES = REPO / "pipelines" / "stages"


def _imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at any depth of the file (lazy imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _files(room: str) -> list[pathlib.Path]:
    return sorted((REPO / room).rglob("*.py"))


def _offending(files: list[pathlib.Path], banned) -> dict[str, list[str]]:
    found = {}
    for path in files:
        bad = sorted(name for name in _imports(path) if banned(name))
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


def test_the_rules_see_real_imports():
    assert "catalog.ledger" in _imports(REPO / "pipelines" / "stage.py")
    assert any(name.startswith("training.models") for name in _imports(STAGES / "embed.py"))  # a lazy import


def _registered_stage_modules() -> set[str]:
    """The module names of the runner's registry (``STAGE_MODULES``), read from its source."""
    tree = ast.parse((STAGES / "__init__.py").read_text())
    (table,) = [node.value for node in ast.walk(tree) if isinstance(node, ast.AnnAssign)
                and getattr(node.target, "id", None) == "STAGE_MODULES"]
    return set(ast.literal_eval(table).values())


def test_every_stage_module_is_registered_and_every_registered_one_is_in_stages():
    in_folder = {f"pipelines.stages.{p.stem}" for p in STAGES.glob("*.py") if p.stem != "__init__"}
    assert _registered_stage_modules() == in_folder  # so the rule below sees every stage, explore's included


def test_no_stage_module_imports_another_stage_module():
    stage_modules = _registered_stage_modules()
    for own in stage_modules:
        path = REPO / (own.replace(".", "/") + ".py")
        bad = sorted(n for n in _imports(path) if any(n == m or n.startswith(m + ".") for m in stage_modules - {own}))
        assert not bad, f"{path.name} imports {bad}: stages talk through the catalog and the runner's registry"


# The one sanctioned exception: catalog/ray_runtime.py starts Ray for every room, importing it lazily.
ALLOWED = {"catalog/ray_runtime.py": {"ray"}}


@pytest.mark.parametrize(("room", "banned_prefixes"), [
    ("training", ("curation", "pipelines")),
    ("curation", ("pipelines", "ray")),
    ("catalog", ("curation", "pipelines", "training", "ray", "torch")),
])
def test_rooms_import_only_downwards(room, banned_prefixes):
    found = _offending(_files(room), lambda n: n.split(".")[0] in banned_prefixes)
    found = {path: names for path, names in found.items() if set(names) - ALLOWED.get(path, set())}
    assert not found, f"{room}/ must not import {banned_prefixes}: {found}"


def test_ray_runtime_imports_ray_only_inside_its_functions():
    tree = ast.parse((REPO / "catalog" / "ray_runtime.py").read_text())
    top_level = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    assert "ray" in _imports(REPO / "catalog" / "ray_runtime.py") and "ray" not in top_level
