"""The layering of the code, held by reading every import (ast; function-level and TYPE_CHECKING
imports count too). Each rule is the one its package's `__init__` docstring states.

- `workers/` (the inference layer) imports nothing of `cluster`.
- Only `cluster/actors/`, `cluster/bench/`, `cluster/cli.py` and `deploy/` import `ray` or
  `cluster.actors`.
- Each subpackage of `cluster` imports only the layers below it (ALLOWED); `cluster/worker/` and
  `cluster/services/` know nothing of wasm.
- The SDK compiled into inferlets imports only the standard library, itself and its bindings.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# what each part of `cluster` may import of `cluster` (besides itself); None = anything
ALLOWED: dict[str, set[str] | None] = {
    "errors": set(),
    "pending": set(),
    "metrics": set(),
    "worker": {"errors", "pending", "metrics"},
    "services": {"errors", "pending", "metrics"},
    "rpc": {"errors", "pending", "metrics", "worker", "services", "proto"},
    "runtime": {"errors", "pending", "metrics", "worker", "services", "rpc"},
    "api": {"errors", "pending", "metrics", "worker", "services", "rpc", "runtime", "proto"},
    "proto": {"proto"},
    "actors": None,
    "bench": None,
    "cli": None,
}
NO_WASM = {"worker", "services", "rpc"}  # nor may these import wasmtime
RAY_ALLOWED = ("cluster/actors/", "cluster/bench/", "cluster/cli.py", "deploy/")
SDK_OWN = {"pie_sdk", "wit_world", "componentize_py_types"}  # the SDK, its bindings, componentize-py's types


def imported_modules(rel: str, source: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the source of file `rel`, relative ones resolved."""
    tree = ast.parse(source, rel)
    package = tuple(rel.split("/")[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ((node.module,) if node.module else ()))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from cluster import x`
    return found


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name)


def part_of_cluster(module: str) -> str | None:
    """'runtime' for cluster.runtime.scheduler, 'errors' for cluster.errors, None outside cluster."""
    parts = module.split(".")
    return parts[1] if parts[0] == "cluster" and len(parts) > 1 else None


def broken_rules(sources: list[tuple[str, str]]) -> list[str]:
    """Every import in the (path relative to the root, source) pairs that breaks a rule, as
    'file:line: module (the rule)'."""
    problems = []
    for rel, source in sources:
        mine = part_of_cluster(rel.removesuffix(".py").replace("/", ".")) if rel.startswith("cluster/") else None
        if rel == "cluster/__init__.py":
            mine = "errors"  # the package's docstring only: imports nothing
        for line, module in imported_modules(rel, source):
            top = module.split(".")[0]
            where = f"{rel}:{line}: {module}"
            if rel.startswith("workers/") and top == "cluster":
                problems.append(f"{where} (workers/ imports nothing of cluster)")
            if (top == "ray" or module.startswith("cluster.actors")) and not rel.startswith(RAY_ALLOWED):
                problems.append(f"{where} (only {', '.join(RAY_ALLOWED)} import ray or cluster.actors)")
            if mine in NO_WASM and top == "wasmtime":
                problems.append(f"{where} (cluster/{mine}/ knows nothing of wasm)")
            theirs = part_of_cluster(module)
            allowed = ALLOWED.get(mine, set()) if mine else None
            if theirs and allowed is not None and theirs != mine and theirs not in allowed:
                problems.append(f"{where} (cluster/{mine} may import only {sorted(allowed) or 'nothing'} of cluster)")
            if rel.startswith("inferlets/sdk/") and top not in SDK_OWN and top not in sys.stdlib_module_names:
                problems.append(f"{where} (the SDK imports only the standard library and its own bindings)")
    return problems


def test_every_part_of_cluster_has_a_rule():
    parts = {p.stem if p.is_file() else p.name for p in (ROOT / "cluster").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert parts == set(ALLOWED), f"parts of cluster without a rule, or rules without a part: {parts ^ set(ALLOWED)}"


def test_the_code_keeps_its_layers():
    files = python_files("cluster", "workers", "deploy", "inferlets/sdk")
    assert len(files) > 80
    problems = broken_rules([(p.relative_to(ROOT).as_posix(), p.read_text()) for p in files])
    assert not problems, "imports that break the layering:\n" + "\n".join(problems)


@pytest.mark.parametrize("folder, source, rule", [
    ("workers", "from cluster.errors import InferletError\n", "workers/ imports nothing of cluster"),
    ("cluster/worker", "import wasmtime\n", "knows nothing of wasm"),
    ("cluster/worker", "from cluster.runtime import sandbox\n", "cluster/worker may import only"),
    ("cluster/services", "from ..rpc import frames\n", "cluster/services may import only"),
    ("cluster/api", "import ray\n", "only cluster/actors/"),
    ("cluster/runtime", "def f():\n    from cluster.actors import gateway\n", "only cluster/actors/"),
    ("cluster/rpc", "from cluster import runtime\n", "cluster/rpc may import only"),
    ("inferlets/sdk/pie_sdk", "import numpy\n", "the SDK imports only"),
    ("inferlets/sdk/pie_sdk", "from cluster.pending import Pending\n", "the SDK imports only"),
])
def test_a_broken_rule_is_found(folder, source, rule):
    """Each rule fires on a deliberate violation in a module of that folder."""
    problems = broken_rules([(f"{folder}/violation.py", source)])
    assert any(rule in p for p in problems), problems
