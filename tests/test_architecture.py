"""The import rules of ARCHITECTURE.md, enforced on the source (static: parses imports, runs nothing).

- The shared contracts (wire protocol, drift layout, model identity/schema, firmware profiles, state-dir layout)
  import only the standard library, numpy, ``cryptography``, msgpack and each other.
- ``fleet_server`` may import the shared contracts, never the device runtime parts of ``agent``.
- ``agent`` never imports ``fleet_server``.
- The agent stays light: no FastAPI, SQLModel, SQLAlchemy, pandas or TensorFlow anywhere in ``agent``.
- Each foreign runtime is imported in exactly one adapter module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("agent.protocol", "agent.drift", "agent.model", "agent.profiles", "agent.statedir", "agent.bundle")
# What the server may take from the agent package besides the shared contracts.
SERVER_MAY_USE = (*SHARED, "agent.clitools", "agent.fsutil")  # CLI helpers; durable-write helpers (stdlib only)
SHARED_THIRD_PARTY = {"numpy", "cryptography", "msgpack"}
HEAVY = {"fastapi", "sqlmodel", "sqlalchemy", "pandas", "tensorflow", "starlette", "alembic", "uvicorn"}
ADAPTERS = {
    "onnxruntime": {"agent.runtime.onnx_backend"},
    "ai_edge_litert": {"agent.runtime.litert_backend"},
    "tflite_runtime": {"agent.runtime.litert_backend"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, mod: str | None = None) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mod = mod or _module_name(path)
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = mod.split(".")
                if path.name != "__init__.py":
                    pkg = pkg[:-1]
                base = pkg[: len(pkg) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append(name)
            # ``from agent import runtime`` imports the sub-module agent.runtime: record it too.
            for a in node.names:
                sub = f"{name}.{a.name}"
                target = ROOT / Path(*sub.split("."))
                if sub.startswith(("agent.", "fleet_server.")) and (
                        target.is_dir() or target.with_suffix(".py").exists()):
                    out.append(sub)
    return out


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_shared_contracts_import_only_stdlib_numpy_cryptography_msgpack() -> None:
    bad: list[str] = []
    for path in _files("agent"):
        mod = _module_name(path)
        if not _within(mod, SHARED):
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "agent":
                if name != "agent" and not _within(name, SHARED):
                    bad.append(f"{mod} imports {name}")
            elif top == "__future__" or top in sys.stdlib_module_names or top in SHARED_THIRD_PARTY:
                continue
            else:
                bad.append(f"{mod} imports {name}")
    assert not bad, "shared contracts must stay pure:\n" + "\n".join(bad)


def test_fleet_server_uses_only_shared_parts_of_agent() -> None:
    bad = [
        f"{_module_name(p)} imports {name}"
        for p in _files("fleet_server")
        for name in _imports(p)
        if name.split(".")[0] == "agent" and name != "agent" and not _within(name, SERVER_MAY_USE)
    ]
    assert not bad, "\n".join(bad)


def test_agent_never_imports_fleet_server_or_heavy_libraries() -> None:
    bad = [
        f"{_module_name(p)} imports {name}"
        for p in _files("agent")
        for name in _imports(p)
        if name.split(".")[0] in HEAVY | {"fleet_server"}
    ]
    assert not bad, "\n".join(bad)


def test_each_runtime_imported_in_exactly_one_adapter() -> None:
    found: dict[str, set[str]] = {k: set() for k in ADAPTERS}
    for p in [*_files("agent"), *_files("fleet_server")]:
        for name in _imports(p):
            top = name.split(".")[0]
            if top in found:
                found[top].add(_module_name(p))
    for lib, modules in found.items():
        assert modules <= ADAPTERS[lib], f"{lib} imported outside its adapter: {sorted(modules - ADAPTERS[lib])}"
    assert found["onnxruntime"] and found["ai_edge_litert"]


def test_import_rule_checker_sees_violations(tmp_path: Path) -> None:
    """The checker itself must be able to fail: feed it a file that breaks the rules."""
    fake = tmp_path / "probe.py"
    fake.write_text("import fastapi\nfrom agent.runtime import host\nfrom .. import runtime\n")
    names = _imports(fake, "agent.protocol.probe")
    assert "fastapi" in names and "agent.runtime" in names and "agent.runtime.host" in names
    assert not _within("agent.runtime", SHARED) and _within("agent.protocol.codec", SHARED)
