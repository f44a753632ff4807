"""The package's shape rules that a reader relies on: no function in dam_mergekit/ is longer
than 80 lines (docstring included), so each one can be read whole."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dam_mergekit"
LONGEST = 80


def long_functions(root: Path, limit: int = LONGEST) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(
                        f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines})"
                    )
    return found


def test_no_function_is_longer_than_80_lines():
    assert long_functions(PACKAGE) == []


def test_the_rule_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LONGEST))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path) == [f"{tmp_path.name}/m.py:5 long ({LONGEST + 1})"]
