"""The package's dependency rules, read from the imports of every module (lazy imports inside functions too).

    algo/      pure SAGE math: nothing of rollout/, parallel/, tasks/, actor/, megatron-core,
               torch.distributed, Ray or vLLM
    parallel/  everything Megatron, no algorithm: nothing of algo/, rollout/, tasks/, actor/
    tasks/     prompt data and toy tasks: nothing of rollout/, actor/, Ray or vLLM
    rollout/   engines and weight movement: nothing of algo/, tasks/, actor/
    actor/     the Megatron actor: nothing of rollout/ or tasks/
and no module imports the loop (train.py) or the CLI, except the entry points named in ENTRY_POINTS.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sage_megatron"
ENTRY_POINTS = {"sage_megatron.cli", "sage_megatron.comparison"}   # may import the loop
LOOP_AND_CLI = ("sage_megatron.train", "sage_megatron.cli")
RULES: dict[str, tuple[str, ...]] = {
    "sage_megatron.algo": ("sage_megatron.rollout", "sage_megatron.parallel", "sage_megatron.tasks",
                           "sage_megatron.actor", "megatron", "torch.distributed", "ray", "vllm"),
    "sage_megatron.parallel": ("sage_megatron.algo", "sage_megatron.rollout", "sage_megatron.tasks",
                               "sage_megatron.actor"),
    "sage_megatron.tasks": ("sage_megatron.rollout", "sage_megatron.actor", "ray", "vllm"),
    "sage_megatron.rollout": ("sage_megatron.algo", "sage_megatron.tasks", "sage_megatron.actor"),
    "sage_megatron.actor": ("sage_megatron.rollout", "sage_megatron.tasks"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(source: str, *, module: str) -> set[str]:
    """Every module an ``import``/``from ... import`` names (relative imports resolved against ``module``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)   # "from pkg import submodule"
    return found


def violations(module: str, imports: set[str]) -> list[str]:
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    out = []
    for owner, banned in RULES.items():
        if under(module, owner):
            out += [f"{module} imports {name} ({owner} may not import {b})"
                    for name in sorted(imports) for b in banned if under(name, b)]
    if module not in ENTRY_POINTS:
        out += [f"{module} imports {name} (only {sorted(ENTRY_POINTS)} may import the loop or the CLI)"
                for name in sorted(imports) for b in LOOP_AND_CLI if under(name, b) and module != b]
    return out


def package_modules() -> list[tuple[str, Path]]:
    return [(module_name(p), p) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_package_module_keeps_the_dependency_rules():
    found = []
    for module, path in package_modules():
        found += violations(module, imported_modules(path.read_text(), module=module))
    assert not found, "\n".join(found)


def test_the_rules_cover_every_room():
    rooms = {m.split(".")[1] for m, p in package_modules() if p.parent != PACKAGE}
    assert {"algo", "parallel", "tasks", "rollout", "actor"} <= rooms
    assert not (PACKAGE / "rl").exists(), "sage_megatron/rl/ was split into algo/, rollout/, tasks/"


@pytest.mark.parametrize("module,source,culprit", [
    ("sage_megatron.algo.x", "def f():\n    import ray\n", "ray"),
    ("sage_megatron.algo.x", "from megatron.core import parallel_state\n", "megatron.core"),
    ("sage_megatron.algo.x", "import torch.distributed as dist\n", "torch.distributed"),
    ("sage_megatron.algo.x", "from sage_megatron.rollout.pool import RolloutPool\n", "sage_megatron.rollout.pool"),
    ("sage_megatron.algo.x", "from ..tasks import toy_task\n", "sage_megatron.tasks"),
    ("sage_megatron.parallel.x", "from sage_megatron import algo\n", "sage_megatron.algo"),
    ("sage_megatron.tasks.x", "from vllm import LLM\n", "vllm"),
    ("sage_megatron.evaluate", "from sage_megatron.train import train\n", "sage_megatron.train"),
    ("sage_megatron.metrics", "from sage_megatron.cli import main\n", "sage_megatron.cli"),
])
def test_the_checker_catches_each_kind_of_violation(module, source, culprit):
    found = violations(module, imported_modules(source, module=module))
    assert any(f"imports {culprit} " in v for v in found), found


def test_allowed_imports_pass():
    assert not violations("sage_megatron.algo.strategies",
                          imported_modules("import torch\nfrom sage_megatron.types import PromptRow\n",
                                           module="sage_megatron.algo.strategies"))
    assert not violations("sage_megatron.comparison", {"sage_megatron.train"})
