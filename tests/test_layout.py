"""The house rules of the package, read from the sources (AST; nothing is imported), so a change that breaks one
fails here:

* no import cycle among mmkit modules, counting imports inside functions too;
* the systems (m6, vlmo, mplug) never import each other; the shared floors import no system;
* no module imports a ``_private`` name from another file; the package never reaches into tests/;
* model files hold configs, modules and heads: no recipes, app entries or training loops;
* checkpoints are loaded by name only where a reader expects it (recipes, app entries, the zoo, benchmarks):
  no task, floor or model file calls ``hub.load`` / ``mmkit.load``, so no default argument loads one behind the
  caller's back.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mmkit"
SYSTEMS = ("m6", "vlmo", "mplug")
FLOORS = ("nn", "objectives", "data", "evaluation", "tokenizer", "train", "generation", "registry", "io", "config",
          "hub", "vqgan", "params", "viz")
# Where loading a checkpoint by name is the point of the module.
LOADERS_OK = ("recipes", "apps", "zoo", "bench", "cli", "hub")


def _modname(p: Path) -> str:
    parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_modname(p): p for p in PKG.rglob("*.py")}
TREES = {m: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for m, p in MODULES.items()}


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if MODULES[mod].name == "__init__.py" else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(target: str) -> str | None:
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _imports(mod: str) -> list[tuple[str, str | None]]:
    """(target module, imported name or None) of every import statement of ``mod``, at any depth."""
    out = []
    for node in ast.walk(TREES[mod]):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, node)
            out += [(f"{base}.{a.name}", a.name) for a in node.names] + [(base, None)]
    return out


EDGES = {m: {o for t, _ in _imports(m) if (o := _owner(t)) and o != m} for m in MODULES}


def _area(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_rules_see_the_whole_package():
    assert {"mmkit.registry", "mmkit.zoo", "mmkit.m6.model", "mmkit.nn.attention", "mmkit.objectives.itc"} <= set(MODULES)


def test_no_import_cycle():
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):                                   # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in EDGES[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in MODULES:
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_systems_never_import_each_other_and_floors_import_no_system():
    bad = []
    for m, targets in EDGES.items():
        here = _area(m)
        for t in targets:
            there = _area(t)
            if there in SYSTEMS and here in SYSTEMS and there != here:
                bad.append(f"{m} -> {t} (systems never import each other: move what both need down)")
            if there in SYSTEMS and here in FLOORS:
                bad.append(f"{m} -> {t} (a shared floor imports no system)")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_file_and_no_reach_into_tests():
    bad = []
    for m in MODULES:
        for target, name in _imports(m):
            if target.split(".")[0] == "tests":
                bad.append(f"{m} imports {target}")
            o = _owner(target)
            if name and name.startswith("_") and not name.startswith("__") and o and o != m and target not in MODULES:
                bad.append(f"{m} takes {name} from {o}")
        if "sys.path" in MODULES[m].read_text(encoding="utf-8") and "tests" in MODULES[m].read_text(encoding="utf-8"):
            bad.append(f"{m} edits sys.path toward tests/")
    assert not bad, "\n".join(bad)


def _calls(tree: ast.AST) -> list[str]:
    """Names of the functions a module calls: ``f(...)`` -> "f", ``torch.optim.AdamW(...)`` -> "AdamW" (method calls
    on ``self`` and other objects, like ``self.train(mode)``, are left out)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                names.append(f.id)
            elif isinstance(f, ast.Attribute) and f.attr[:1].isupper():
                names.append(f.attr)
    return names


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if m.endswith(".model") and _area(m) in SYSTEMS + ("vqgan",)))
def test_model_files_hold_configs_modules_and_heads_only(mod):
    calls = _calls(TREES[mod])
    for forbidden in ("recipe", "register_recipe", "register_vqa_model", "register_t2i_model", "train", "AdamW"):
        assert forbidden not in calls, f"{mod} calls {forbidden}(): recipes, app entries and training live elsewhere"
    for node in ast.walk(TREES[mod]):
        if isinstance(node, ast.ImportFrom) and node.module and ".tasks" in node.module:
            pytest.fail(f"{mod} imports {node.module}: a model file never depends on its tasks")


def test_checkpoints_are_loaded_by_name_only_where_a_reader_expects_it():
    bad = []
    for m, tree in TREES.items():
        if any(part in LOADERS_OK for part in m.split(".")[1:]):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "load", "checkpoint_dir") and getattr(node.func.value, "id", "") in ("hub", "mmkit", "zoo"):
                bad.append(f"{m}:{node.lineno} calls {node.func.value.id}.{node.func.attr}(...)")
    assert not bad, "load checkpoints in recipes / apps / the zoo and pass models in:\n" + "\n".join(bad)


def test_every_system_package_registers_on_import_and_the_zoo_imports_it():
    zoo_imports = {t for t, _ in _imports("mmkit.zoo")}
    for system in SYSTEMS:
        if f"mmkit.{system}" in MODULES:
            assert f"mmkit.{system}" in zoo_imports, f"mmkit.zoo must import mmkit.{system}"
