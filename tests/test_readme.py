"""Every command README.md shows in a ```bash block, checked as a user would meet it: a documented
command that fails is a bug.

- Quick, offline commands run as written, in a copy of the repository where the demo's earlier
  steps have left what they leave (out/final.pt, out/sft/final.pt, ...: tiny models here).
- Commands that train for minutes, need the network, a GPU cluster or a model the reader brings
  (`path/to/...`, a hub id) are checked to parse: the script's own configurator (or argparse)
  accepts every argument and every config file it names; for sample.py and eval.py, the run gets
  as far as loading that model and stops there with one line.
"""
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training_runs import ENV, ROOT  # noqa: E402

TRAINING = ('pretrain.py', 'sft.py', 'dpo.py', 'grpo.py')


def readme_commands():
    """(line number, [argv]) for each command of each ```bash block; `a && b` gives two."""
    text = (ROOT / 'README.md').read_text()
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
    """The script's own argument handling accepts args (config files named relative to the repo)."""
    sys.path.insert(0, str(ROOT))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if script == 'eval.py':
            import eval as evaluate
            evaluate.parse_args(args)
            return
        from configurator import apply_overrides
        if script == 'data.py':
            import data
            apply_overrides(dict(data.DEFAULTS), list(data.DEFAULTS), args)
            return
        module = __import__(script[:-3])  # importing a training stage runs nothing
        g = {k: getattr(module, k) for k in module.config_keys}
        apply_overrides(g, module.config_keys, args)
    finally:
        os.chdir(cwd)


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


COMMANDS = readme_commands()


def test_readme_shows_the_commands_of_every_stage():
    scripts = {script_and_args(argv)[0] for _, argv in COMMANDS if argv[0] != 'pip' and '-m' not in argv[:2]}
    assert {'data.py', 'pretrain.py', 'sft.py', 'dpo.py', 'grpo.py', 'eval.py', 'sample.py'} <= scripts


@pytest.mark.parametrize('line, argv', COMMANDS, ids=[f"line{n}" for n, _ in COMMANDS])
def test_readme_command(line, argv, demo_dir):
    if argv[0] == 'pip':
        requirements = argv[argv.index('-r') + 1]
        assert (ROOT / requirements).is_file(), requirements
        return
    if argv[:3] == ['python', '-m', 'pytest']:
        assert (ROOT / '.ci' / 'run').read_text().count(' '.join(argv)) == 1  # CI runs exactly this
        return
    script, args = script_and_args(argv)
    assert (ROOT / script).is_file(), script
    for config in (a for a in args if a.startswith('config/')):
        assert (ROOT / config).is_file(), config
    long_or_remote = (script in TRAINING or argv[0] != 'python' or '--dry_run' in args or script == 'bench.py'
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
        assert p.returncode == 0, f"README line {line}: {' '.join(argv)}\n{p.stderr[-3000:]}"
