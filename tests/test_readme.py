"""Every command README.md, docs/*.md and tests/README.md show in a ```bash block, checked as a user
would meet it: a documented command that fails is a bug.

- Quick, offline commands run as written, in a copy of the repository where the demo's earlier
  steps have left what they leave (out/final.pt, out/sft/final.pt, ...: tiny models here).
- Commands that train for minutes, need the network, a GPU or a model the reader brings
  (`path/to/...`, a hub id) are checked to parse: the script's configurator accepts every argument
  over the script's config_keys, and every config file it names (dryrun.py: dryrun.stage_settings);
  for sample.py and eval.py, a run naming such a model gets as far as loading it and stops there
  with one line.
- pytest commands name files that exist and markers that are registered; the test command is the
  one CI runs. Scripts under tests/ (tests/gpu_check.py, ...) are run by their own tests; here they
  are checked to exist and compile.

And the pages around them: README.md stays a front door (at most 300 lines), every relative link
leads to a file, and tests/README.md indexes exactly the tests marked `concept`.
"""
import ast
import importlib
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training_runs import ENV, ROOT  # noqa: E402

PAGES = ['README.md', *sorted(f'docs/{p.name}' for p in (ROOT / 'docs').glob('*.md')), 'tests/README.md']
TRAINING = ('pretrain.py', 'sft.py', 'dpo.py', 'grpo.py')
CI_COMMAND = 'python -m pytest -q tests'


def documented_commands(page):
    """(line number, [argv]) for each command of each ```bash block of a page; `a && b` gives two."""
    text = (ROOT / page).read_text()
    commands = []
    for block in re.finditer(r'```bash\n(.*?)```', text, re.S):
        first_line = text[:block.start()].count('\n') + 2
        lines = block.group(1).replace('\\\n', ' ').splitlines()
        for offset, line in enumerate(lines):
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index('&&') if '&&' in words else len(words)
                if words[0] in ('python', 'torchrun', 'srun', 'pip'):
                    commands.append((first_line + offset, words[:cut]))
                words = words[cut + 1:]
    return commands


def script_and_args(argv):
    """The .py script a command runs and its arguments (after torchrun's / srun's own options)."""
    i = next(i for i, w in enumerate(argv) if w.endswith('.py'))
    return argv[i], [a for a in argv[i + 1:] if a != '&']  # '&': run in the background


def names_a_model_from_elsewhere(args):
    """Whether the command's model is one the toy demo does not make: a reader's own (path/to/...),
    a hub id, or a 7B run's output (out/moxin7b_*)."""
    for i, a in enumerate(args):
        value = a.split('=', 1)[1] if a.startswith(('--ckpt=', '--init_from=')) else \
            args[i + 1] if a in ('--ckpt', '--init_from') and i + 1 < len(args) else None
        if value and ('path/to/' in value or value.startswith('out/moxin7b')
                      or (re.fullmatch(r'[\w.-]+/[\w.-]+', value) and not value.endswith('.pt'))):
            return True
    return False


def parses(script, args):
    """The script's own settings accept args (config files named relative to the repo); the
    configurator raises ConfigError otherwise. Importing a script runs nothing."""
    from configurator import apply_overrides
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if script == 'dryrun.py':  # its own settings, then the stage's
            importlib.import_module('dryrun').stage_settings(args)
            return
        module = importlib.import_module(script[:-3])
        settings = {k: getattr(module, k) for k in module.config_keys}
        apply_overrides(settings, module.config_keys, args)
    finally:
        os.chdir(cwd)


def registered_markers():
    """The marker names tests/conftest.py registers."""
    import conftest
    lines = []
    conftest.pytest_configure(SimpleNamespace(addinivalue_line=lambda name, line: lines.append(line)))
    return {line.split(':')[0] for line in lines}


def check_pytest_command(argv):
    """A pytest command's files and tests exist and its -m markers are registered; the full test
    command is exactly what CI runs."""
    if ' '.join(argv) == CI_COMMAND:
        assert (ROOT / '.ci' / 'run').read_text().count(CI_COMMAND) == 1
    args = iter(argv[3:])
    for a in args:
        if a == '-m':
            names = set(re.findall(r'\w+', next(args))) - {'not', 'and', 'or'}
            assert names <= registered_markers(), names
        elif not a.startswith('-'):
            path, _, test = a.partition('::')
            assert (ROOT / path).exists(), a
            assert not test or f'def {test}(' in (ROOT / path).read_text(), a


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
    """A copy of the repository as a user has it after the demo's steps: tiny stand-ins for the
    demo's checkpoints (Mistral's vocabulary, so every tokenizer call is real), a raw/ folder and a
    prompt file for the examples that name them."""
    import torch
    from model import Transformer, model_args
    from weights import save_checkpoint
    root = tmp_path_factory.mktemp('repo')
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, root / f)
    torch.manual_seed(0)
    model = Transformer(model_args('tiny', vocab_size=32000, max_seq_len=4096))
    model.init_weights()
    for stage in ('', 'sft', 'dpo', 'grpo', 'sft_arithmetic'):
        save_checkpoint(str(root / 'out' / stage / 'final.pt'), model, 'mistral')
    (root / 'raw').mkdir()
    # enough distinct text for data.py's default val_tokens and some training shards
    rng = random.Random(0)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    for n in range(60):
        (root / 'raw' / f'{n}.txt').write_text(' '.join(rng.choice(words) for _ in range(2500)))
    (root / 'prompt.txt').write_text('def fibonacci(n):')
    return root


COMMANDS = [(page, line, argv) for page in PAGES for line, argv in documented_commands(page)]


def test_readme_is_a_front_door_that_shows_every_stage():
    assert len((ROOT / 'README.md').read_text().splitlines()) <= 300
    scripts = {script_and_args(argv)[0] for line, argv in documented_commands('README.md')
               if argv[0] != 'pip' and '-m' not in argv[:2]}
    assert {'data.py', 'pretrain.py', 'sft.py', 'dpo.py', 'grpo.py', 'eval.py', 'sample.py'} <= scripts
    assert any(argv == ['python', '-m', 'pytest', '-m', 'concept', 'tests'] for _, _, argv in COMMANDS)


@pytest.mark.parametrize('page', PAGES)
def test_links_lead_to_files(page):
    text = (ROOT / page).read_text()
    for target in re.findall(r'\]\(([^)#]+)(?:#[^)]*)?\)', text):
        if not target.startswith('http'):
            assert ((ROOT / page).parent / target).exists(), f"{page}: link to {target}"


@pytest.mark.parametrize('page', PAGES)
def test_read_first_pointers_name_real_functions(page):
    """Each `file.py:name` (or `file.py:Class.method`) a page points a reader to is defined there."""
    for path, name in re.findall(r'`([\w/]+\.py):([\w.]+)`', (ROOT / page).read_text()):
        tree = ast.parse((ROOT / path).read_text())
        for part in name.split('.'):
            tree = next((n for n in tree.body if getattr(n, 'name', None) == part), None)
            assert tree is not None, f"{page}: {path} defines no {name}"


def test_concept_index_names_exactly_the_marked_tests():
    """tests/README.md's table of the tests that teach, against the @pytest.mark.concept marks."""
    table = [line for line in (ROOT / 'tests' / 'README.md').read_text().splitlines() if line.startswith('|')]
    indexed = set(re.findall(r'`tests/(test_\w+\.py)::(\w+)`', '\n'.join(table)))
    marked = set()
    for path in (ROOT / 'tests').glob('test_*.py'):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == 'pytest.mark.concept'
                                                         for d in node.decorator_list):
                marked.add((path.name, node.name))
    assert marked and indexed == marked, (indexed - marked, marked - indexed)


@pytest.mark.parametrize('page, line, argv', COMMANDS, ids=[f"{page}:{line}" for page, line, _ in COMMANDS])
def test_documented_command(page, line, argv, demo_dir):
    if argv[0] == 'pip':
        requirements = argv[argv.index('-r') + 1]
        assert (ROOT / requirements).is_file(), requirements
        return
    if argv[:3] == ['python', '-m', 'pytest']:
        check_pytest_command(argv)
        return
    script, args = script_and_args(argv)
    assert (ROOT / script).is_file(), script
    for path in (a for a in args if a.startswith('config/') or a in TRAINING):
        assert (ROOT / path).is_file(), path
    if script.startswith('tests/'):  # the GPU check, the grader's rates table: their own tests run them
        compile((ROOT / script).read_text(), script, 'exec')
        return
    long_or_remote = (script in TRAINING or argv[0] != 'python' or script in ('dryrun.py', 'bench.py')
                      or (script == 'data.py' and any(a.startswith('config/') for a in args))
                      or (script == 'eval.py' and '--data_dir' not in args and not names_a_model_from_elsewhere(args)))
    if long_or_remote:
        parses(script, args)
        return
    env = {**ENV, 'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(demo_dir / 'hub-cache')}
    p = subprocess.run([sys.executable, script, *args], cwd=demo_dir, env=env, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    if names_a_model_from_elsewhere(args):  # it parses, and stops at loading that model, in one line
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), p.stderr[-2000:]
        assert 'config key' not in lines[0] and ' expects ' not in lines[0], lines[0]
    else:
        assert p.returncode == 0, f"{page} line {line}: {' '.join(argv)}\n{p.stderr[-3000:]}"
