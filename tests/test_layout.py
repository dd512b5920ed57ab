"""The packages import one way (docs/DESIGN.md, Layout): kernels <- model <- qat <- pretrain <- quant
<- study, with data_prep beside kernels at the bottom. Every import counts, the lazy ones inside
functions too: a package may import only packages below it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"kernels": 0, "data_prep": 0, "model": 1, "qat": 2, "pretrain": 3, "quant": 4, "study": 5}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level name) of each absolute import in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def layout_violations(root: Path) -> list[str]:
    """'file:line: P imports Q' for each import of a package not below the importer's."""
    bad = []
    for package, level in LEVEL.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, name in imported_packages(path):
                if name in LEVEL and name != package and LEVEL[name] >= level:
                    bad.append(f"{path.relative_to(root)}:{line}: {package} imports {name}")
    return bad


def test_packages_import_one_way():
    assert layout_violations(ROOT) == []


def test_the_check_finds_an_import_against_the_order(tmp_path):
    for package in LEVEL:
        (tmp_path / package).mkdir()
    (tmp_path / "qat" / "ok.py").write_text("import torch\nfrom model.layers import norm\nfrom . import ok\n")
    (tmp_path / "model" / "bad.py").write_text("def f():\n    from pretrain.config import Config\n")
    (tmp_path / "kernels" / "side.py").write_text("import data_prep.documents\n")
    assert layout_violations(tmp_path) == ["kernels/side.py:1: kernels imports data_prep",
                                           "model/bad.py:2: model imports pretrain"]
