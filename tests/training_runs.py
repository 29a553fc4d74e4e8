"""What the tests of the training stages share: running a stage as a subprocess (alone or under
torchrun), reading the numbers it logged, waiting for it to get somewhere, and checking that bad
input ends in one line and leaves a finished out_dir as it was."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}


def start(script, args, nproc=0, env=None, wait=True):
    """Run `script args` from the repo root, as one process (nproc=0) or under torchrun with nproc
    ranks. wait=True -> (returncode, stdout, stderr); wait=False -> the running Popen."""
    cmd = [sys.executable, script] if nproc == 0 else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', script]
    p = subprocess.Popen([*cmd, *args], cwd=ROOT, env={**ENV, **(env or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def losses(out_dir):
    """{step: loss} from out_dir/log.jsonl; a step logged twice (replayed after a kill) keeps its last value."""
    records = [json.loads(line) for line in open(Path(out_dir) / 'log.jsonl')]
    return {r['step']: r['loss'] for r in records if 'loss' in r}


# what log.jsonl records that depends on the data and the maths, not on the machine's speed
MEASURED = ('tokens_per_s', 'mfu', 'time')


def logged_numbers(out_dir):
    """{(step, name): value} for every number in out_dir/log.jsonl except the speed measurements;
    a step logged twice (replayed after a kill) keeps its last values."""
    records = [json.loads(line) for line in open(Path(out_dir) / 'log.jsonl')]
    return {(r['step'], k): v for r in records for k, v in r.items() if k != 'step' and k not in MEASURED}


def assert_same_numbers(got, expected, rel=1e-4):
    """Every (step, name) of `got` is in `expected` with the same value: integers exactly, floats within rel."""
    assert got, "nothing logged"
    for key, value in sorted(got.items()):
        assert key in expected, f"{key} logged by one run only"
        want = expected[key]
        same = value == want if isinstance(want, int) else abs(value - want) <= rel * abs(want) + 1e-12
        assert same, f"step {key[0]} {key[1]}: {value} != {want}"


def wait_for(predicate, proc, timeout=120):
    """Poll until predicate() holds; fail if proc ends first or it takes longer than timeout seconds."""
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.005)


def tree_digest(path):
    """{relative path: sha256} of every file under path: equal digests, nothing written or lost."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob('*')) if p.is_file()}


def assert_one_line_errors(procs, timeout=300):
    """{expected text: running Popen}: each process ends with exit code 2 and one stderr line
    'error: ...' containing its expected text."""
    for expected, p in procs.items():
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], err


def write_jsonl(path, rows):
    """One JSON object per line, as the stages read .jsonl data."""
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return path
