"""The layers hold: the pure core imports no trio, and imports only run downhill.

The package is a stack of layers (docs/architecture.md): the edge (``cli``, ``check``,
``workers``), the client side (``serve/``), one query's life (``handler``), the answer policy
(``resolver``: cache, coalescing), the upstream side (``upstream/``), the configuration, the
pure core (``core/``) and the error tree. A module may import its own layer and the layers
below it, never one above. ``testing/`` is a helper for tests, benchmarks and the soak: it may
import anything, and nothing of the package imports it.

The graph is read from the source with ``ast`` (no import runs), so a new module is checked
the moment it exists; the purity check then imports the core in a fresh interpreter, because
this test process has long since imported trio (conftest).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dot_proxy"

# Top to bottom. A module's layer is the first entry that names it or its folder.
LAYERS: list[tuple[str, ...]] = [
    (
        "dot_proxy.__main__",
        "dot_proxy.cli",
        "dot_proxy.check",
        "dot_proxy.cpus",
        "dot_proxy.healthcheck",
        "dot_proxy.workers",
        "dot_proxy.runner",
        "dot_proxy.reloading",
        "dot_proxy.logs",
        "dot_proxy.settings",
    ),
    ("dot_proxy.serve",),
    ("dot_proxy.handler",),
    ("dot_proxy.resolver", "dot_proxy.routing"),
    ("dot_proxy.upstream",),
    ("dot_proxy.config", "dot_proxy.config_file"),
    ("dot_proxy.core",),
    ("dot_proxy.errors", "dot_proxy"),  # the package's face holds only the version
]
TESTING = "dot_proxy.testing"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        for name in names:
            if module == name or (name != "dot_proxy" and module.startswith(name + ".")):
                return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def imports_of(path: Path) -> set[str]:
    """The dot_proxy modules ``path`` imports (``from dot_proxy.x import y`` may name a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    own = {name for name in found if name == "dot_proxy" or name.startswith("dot_proxy.")}
    # Keep only names that are modules or packages of ours (not functions imported from them).
    return {name for name in own if _exists(name)}


def _exists(module: str) -> bool:
    relative = Path(*module.split("."))
    return (ROOT / relative).with_suffix(".py").exists() or (ROOT / relative).is_dir()


MODULES = sorted(
    (module_name(path), path) for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts
)


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[name for name, _ in MODULES])
def test_imports_run_downhill(module: str, path: Path) -> None:
    imported = imports_of(path)
    if module.startswith(TESTING):
        return
    assert not [name for name in imported if name.startswith(TESTING)], (
        f"{module} imports the testing helpers"
    )
    mine = layer_of(module)
    uphill = sorted(name for name in imported if layer_of(name) < mine)
    assert not uphill, f"{module} imports from a higher layer: {uphill}"


def test_every_layer_has_modules() -> None:
    # A renamed folder must not leave a layer that silently matches nothing.
    layers = {layer_of(name) for name, _ in MODULES if not name.startswith(TESTING)}
    assert layers == set(range(len(LAYERS)))


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )


CORE = sorted(name for name, _ in MODULES if name.startswith("dot_proxy.core."))


def test_the_core_folder_holds_the_pure_modules() -> None:
    expected = {
        "access",
        "cache",
        "edns",
        "framing",
        "health",
        "message",
        "metrics",
        "pins",
        "slots",
    }
    assert expected <= {name.rpartition(".")[2] for name in CORE}


def test_pure_modules_do_not_import_trio() -> None:
    pure = ", ".join([*CORE, "dot_proxy.config", "dot_proxy.config_file", "dot_proxy.errors"])
    result = run(
        f"import {pure}, sys\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'socket', 'ssl'))\n"
        "shell = sorted(m for m in sys.modules if m.startswith(('dot_proxy.serve', "
        "'dot_proxy.upstream', 'dot_proxy.handler', 'dot_proxy.cli')))\n"
        "assert not bad and not shell, (bad, shell)"
    )
    assert result.returncode == 0, result.stderr


def test_the_group_talks_to_the_pools_only() -> None:
    # The group's policy (failover, hedging, probing) sees each upstream as a pool: it never
    # reaches past one to a connection, its writer or its TLS.
    below_the_pool = {"connection", "writer", "tls", "trio_private", "socket_stream"}
    imported = imports_of(PACKAGE / "upstream" / "group.py")
    reached = {name.removeprefix("dot_proxy.upstream.") for name in imported}
    assert not reached & below_the_pool
