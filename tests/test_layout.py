"""The house's rules (docs/layout.md), read from the code's own imports with `ast`: the four commands alone at
the root, the wings importing one way (common <- voice <- night <- feedback; data on common alone), nothing in
the package importing a command, the contract rooms free of torch, and rooms small enough to read."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "voicetune"
COMMANDS = ("prepare_data", "train_vits", "train_feedback", "speak")
ORDER = ("common", "voice", "night", "feedback")  # a wing may import the wings before it, never one after
ALLOWED = {wing: set(ORDER[:i + 1]) for i, wing in enumerate(ORDER)} | {"data": {"common", "data"}}
CONTRACTS = ("common/run_files.py", "common/speech.py", "common/run_folder.py", "common/run_errors.py",
             "common/kurmanji_text.py")  # what a reader of a run or of prepared data needs: never torch
HEAVY = ("torch", "transformers")


def package_files():
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, os.path.join(ROOT, PACKAGE)).replace(os.sep, "/"), path


def imports(path, top_level_only=False):
    """The modules `path` imports (`a.b.c` for `from a.b import c` too), module level only when asked."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def wing_of(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == PACKAGE else None


def test_the_root_holds_the_four_commands_and_no_other_python_file():
    assert sorted(n[:-3] for n in os.listdir(ROOT) if n.endswith(".py")) == sorted(COMMANDS)


@pytest.mark.parametrize("relative,path", sorted(package_files()))
def test_a_wing_imports_only_the_wings_before_it_and_never_a_command(relative, path):
    wing = relative.split("/")[0]
    if wing not in ALLOWED:
        assert relative == "__init__.py", f"{relative}: every module belongs to a wing folder"
        return
    for module in imports(path):
        assert module.split(".")[0] not in COMMANDS, f"{relative} imports the command {module}"
        other = wing_of(module)
        assert other is None or other in ALLOWED[wing], f"{relative} ({wing}) imports {module} ({other})"


def test_the_contract_rooms_import_no_torch_even_through_the_package():
    by_module = {f"{PACKAGE}.{rel[:-3].replace('/', '.')}": path for rel, path in package_files()}
    for contract in CONTRACTS:
        seen, todo = set(), [f"{PACKAGE}.{contract[:-3].replace('/', '.')}"]
        while todo:
            module = todo.pop()
            if module in seen or module not in by_module:
                continue
            seen.add(module)
            for imported in imports(by_module[module], top_level_only=True):
                assert imported.split(".")[0] not in HEAVY, f"{contract} reaches {imported} through {module}"
                todo.append(imported)


def line_count(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def test_commands_stay_thin_and_no_module_outgrows_a_room():
    for command in COMMANDS:
        assert line_count(os.path.join(ROOT, f"{command}.py")) <= 350, f"{command}.py is over 350 lines"
    for relative, path in package_files():
        assert line_count(path) <= 600, f"{relative} is over 600 lines"


def test_no_two_rooms_import_each_other_even_in_a_circle():
    graph = {f"{PACKAGE}.{rel[:-3].replace('/', '.')}": imports(path, top_level_only=True)
             for rel, path in package_files()}
    graph = {module: {m for m in found if m in graph and m != module} for module, found in graph.items()}
    done, path = set(), []

    def visit(module):
        assert module not in path, "import circle: " + " -> ".join(path[path.index(module):] + [module])
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)
    for module in sorted(graph):
        visit(module)
