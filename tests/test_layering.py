"""The dependency directions DESIGN.md draws, checked on the source."""

import ast
from pathlib import Path

import kvfuse

PACKAGE = Path(kvfuse.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def offenders(package: str, forbidden: str) -> list[str]:
    return sorted(
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in (PACKAGE / package).rglob("*.py")
        for name in imported_modules(path)
        if name == forbidden or name.startswith(forbidden + ".")
    )


def test_engine_knows_no_rule_by_name():
    """rewriter/ imports no module of patterns/: rules plug in through kvfuse/optimize.py."""
    assert offenders("rewriter", "kvfuse.patterns") == []


def test_runtime_needs_no_optimizer():
    """A deployed model runs without the rewriter, the rules or the exporters."""
    for forbidden in ("kvfuse.rewriter", "kvfuse.patterns", "kvfuse.exporters", "kvfuse.optimize"):
        assert offenders("runtime", forbidden) == []


def test_server_uses_the_runtime_only():
    """serve/ drives the runtime; it needs no optimizer, exporter or rule."""
    for forbidden in ("kvfuse.rewriter", "kvfuse.patterns", "kvfuse.exporters", "kvfuse.optimize"):
        assert offenders("serve", forbidden) == []


def test_jobs_use_export_and_optimize_only_through_their_public_functions():
    """jobs/ knows nothing of the exporters', the engine's, the rules' or the runtime's insides:
    it calls kvfuse.export, kvfuse.optimize and kvfuse.load."""
    for forbidden in ("kvfuse.rewriter", "kvfuse.patterns", "kvfuse.exporters", "kvfuse.runtime"):
        assert offenders("jobs", forbidden) == []
