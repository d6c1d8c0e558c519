"""DESIGN.md §2: imports point one way (jobs → distributed → {models, clustering});
models/ and clustering/ never import Ray, and models/ never imports clustering/."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package,forbidden", [("models", {"ray", "clustering", "distributed", "jobs"}),
                                               ("clustering", {"ray", "distributed", "jobs"}),
                                               ("distributed", {"jobs"})])
def test_imports_point_one_way(package, forbidden):
    for path in sorted((REPO / package).glob("*.py")):
        bad = imported_modules(path) & forbidden
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
