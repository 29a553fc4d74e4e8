"""The house rules of the codebase (DESIGN.md), checked on the source itself: the stages depend on the
ground floor and never on each other, nothing imports in a cycle, every script reads its settings
through configurator.py, and no function grows past 8 parameters or 80 lines."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = {'data', 'pretrain', 'sft', 'dpo', 'grpo', 'eval', 'sample'}
TOOLS = {'bench', 'dryrun'}  # they measure and simulate the stages, so they may import them (all but eval.py)
SCRIPTS = STAGES | TOOLS  # every file run as `python X.py [config/file.py] [--key=value ...]`
SOURCES = sorted(ROOT.glob('*.py')) + sorted((ROOT / 'tasks').glob('*.py'))


def module_name(path):
    relative = path.relative_to(ROOT).with_suffix('')
    parts = relative.parts[:-1] if relative.name == '__init__' else relative.parts
    return '.'.join(parts)


MODULES = {module_name(p): p for p in SOURCES}


def project_imports(path):
    """The project modules a file imports anywhere in it (inside functions too), by name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            # `from tasks.math_grader import x` imports tasks too; `import tasks` is tasks alone
            parts = name.split('.')
            found |= {'.'.join(parts[:i]) for i in range(1, len(parts) + 1)} & MODULES.keys()
    return found


def test_no_stage_imports_another_and_the_ground_floor_imports_no_stage():
    for name, path in MODULES.items():
        stages_imported = project_imports(path) & (STAGES - {name} if name not in TOOLS else {'eval'})
        assert not stages_imported, f"{path.name} imports the stage script(s) {sorted(stages_imported)}"


def test_no_import_cycles():
    graph = {name: project_imports(path) - {name} for name, path in MODULES.items()}
    # a package imports its own modules: that is structure, not a cycle
    graph = {name: {d for d in deps if not d.startswith(name + '.')} for name, deps in graph.items()}
    visiting, done = [], set()

    def visit(name):
        if name in visiting:
            raise AssertionError(f"import cycle: {' -> '.join(visiting[visiting.index(name):] + [name])}")
        if name not in done:
            visiting.append(name)
            for dep in sorted(graph[name]):
                visit(dep)
            visiting.pop()
            done.add(name)
    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_every_script_takes_its_settings_through_the_configurator(script):
    source = MODULES[script].read_text()
    assert 'argparse' not in source, f"{script}.py parses its own arguments"
    module = importlib.import_module(script)  # importing a script runs nothing
    assert module.config_keys and all(hasattr(module, k) for k in module.config_keys)


def test_functions_stay_short():
    too_big = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
                params = [p for p in params if p is not None and p.arg not in ('self', 'cls')]
                lines = node.end_lineno - node.lineno + 1
                if len(params) > 8 or lines > 80:
                    too_big.append(f"{path.name}:{node.lineno} {node.name}: {len(params)} parameters, {lines} lines")
    assert not too_big, '\n'.join(too_big)
