"""The repository's layout: which module may import which (the format below data, evaluation and the Space; nothing
imports back up), no import circles, and an installation that adds only the project's own names."""

import ast
import configparser
import os

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_modules() -> dict[str, str]:
    """`{module name: path}` of every Python module of the project (root modules, packages, scripts, the Space)."""
    modules = {}
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            modules[name[:-3]] = os.path.join(ROOT, name)
    for package in ("puma_eval",):
        for name in os.listdir(os.path.join(ROOT, package)):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                modules[module] = os.path.join(ROOT, package, name)
    modules["space.app"] = os.path.join(ROOT, "space", "app.py")
    modules["hub_card.handler"] = os.path.join(ROOT, "hub_card", "handler.py")
    return modules


def imported_project_modules(module: str, path: str, known: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its file (module level or inside functions)."""
    package = module.rsplit(".", 1)[0] if "." in module or module == "puma_eval" else ""
    if module == "puma_eval":
        package = "puma_eval"
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + ("." + base if base else "")
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: imported_project_modules(module, path, set(modules)) for module, path in modules.items()}


def test_no_module_imports_itself_back_through_others(graph):
    # Given every project import, at module level or inside a function
    # When the import graph is searched depth first
    # Then it has no cycle (a cycle is reported as the chain of modules)
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module, forbidden", [
    ("mbeir_puma", {"modeling_puma", "configuration_puma", "data_puma", "trainer_puma", "puma_eval"}),
    ("losses_puma", {"modeling_puma", "data_puma", "trainer_puma", "mbeir_puma", "puma_eval"}),
    ("configuration_puma", "all"),
    ("modeling_puma", "all but configuration_puma"),
    ("hub_card.handler", "all"),
])
def test_lower_modules_import_nothing_above_them(graph, module, forbidden):
    imported = graph[module]
    if forbidden == "all":
        assert imported == set(), imported
    elif forbidden == "all but configuration_puma":
        assert imported <= {"configuration_puma"}, imported
    else:
        assert not {name for name in imported if name.split(".")[0] in forbidden}, imported


def test_only_training_imports_the_training_datasets_and_collator(graph):
    # Evaluation, the Space, the Hub tooling and the trainer read M-BEIR through mbeir_puma, never through data_puma
    importers = {module for module, imported in graph.items() if "data_puma" in imported}
    assert importers <= {"train_puma", "demo", "quickstart"}, importers


def test_installation_adds_only_the_projects_own_names():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    options = config["options"]
    modules = options["py_modules"].split()
    packages = options["packages"].split()
    assert all(name.endswith("_puma") for name in modules), modules
    assert all(name.startswith("puma_") for name in packages), packages
    # every module the Hub files, the trainer, evaluation and the Space need is installed
    assert {"configuration_puma", "modeling_puma", "mbeir_puma", "trainer_puma", "train_puma", "eval_puma"} <= set(modules)
    # the package_dir mapping points at folders that exist, and the console commands at functions that exist
    mapped = dict(line.split("=") for line in options["package_dir"].strip().splitlines())
    for package, folder in mapped.items():
        assert os.path.isdir(os.path.join(ROOT, folder.strip())), (package, folder)
    for line in config["options.entry_points"]["console_scripts"].strip().splitlines():
        command, target = (part.strip() for part in line.split("="))
        module, function = target.split(":")
        tree = ast.parse(open(os.path.join(ROOT, module + ".py"), encoding="utf-8").read())
        assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, command
