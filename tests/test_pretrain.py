"""pretrain.py on CPU: a tiny model on synthetic shards, run as real subprocesses
(single process and torchrun), so signals, kills and resumes are the real thing."""
import importlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import configurator  # noqa: E402
import trainer  # noqa: E402
from training_runs import ENV, ROOT, assert_one_line_errors, assert_same_numbers, logged_numbers, losses, start, wait_for  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from model import Transformer, generate, model_args  # noqa: E402
from weights import load_model  # noqa: E402

STEPS = 24
# global batch 4 x 2 x 1 = 8 sequences; the torchrun test asks for 8 with batch 2 on 2 ranks
TINY = ['--preset=tiny', '--block_size=16', '--batch_size=4', '--grad_accum=2', f'--max_steps={STEPS}',
        '--warmup_steps=4', '--lr=1e-2', '--log_interval=1', '--eval_interval=10', '--eval_batches=2',
        '--ckpt_interval=4', '--keep_last=2', '--seed=7']


def write_shards(path, vocab=256, seed=0):
    """Shards in data.py's format: documents that are arithmetic progressions mod vocab,
    learnable after two tokens, so the loss visibly falls within a few steps."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (('train', 30_000), ('val', 3_000)):
        docs, total = [], 0
        while total < n:
            doc = (rng.integers(vocab) + rng.integers(1, 9) * np.arange(rng.integers(20, 60))) % vocab
            docs.append(doc)
            total += len(doc)
        np.concatenate(docs).astype(np.uint16).tofile(path / f'{split}_0000.bin')
    (path / 'meta.json').write_text(json.dumps({'tokenizer': 'mistral', 'vocab_size': vocab, 'dtype': 'uint16'}))


def run(args, out_dir, data_dir, nproc=0, env=None, wait=True):
    return start('pretrain.py', [*args, f'--out_dir={out_dir}', f'--data_dir={data_dir}'], nproc, env, wait)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('shards')
    write_shards(path)
    return path


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
    """One uninterrupted single-process run that the other runs are compared against."""
    out = tmp_path_factory.mktemp('reference')
    rc, stdout, stderr = run(TINY, out, data_dir)
    assert rc == 0, stderr
    return out, losses(out)


# ----------------------------------------------------------------------------- pure functions

@pytest.mark.concept
def test_lr_schedule():
    peak, warmup, total = 3e-4, 100, 1100
    lr = lambda step: trainer.lr_at(step, peak, warmup, total, min_lr_ratio=0.1)
    assert lr(0) == pytest.approx(peak / 100)
    assert lr(warmup - 1) == pytest.approx(peak)  # warmup ends at the peak
    assert lr(warmup + 500) == pytest.approx(3e-5 + 0.5 * (3e-4 - 3e-5))  # half-way through the cosine: the midpoint
    assert lr(warmup + 250) == pytest.approx(3e-5 + (3e-4 - 3e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr(total) == pytest.approx(3e-5)  # 10% of the peak at the end
    assert all(lr(s) >= lr(s + 1) for s in range(warmup, total))


def test_weight_decay_only_on_matrices():
    model = Transformer(model_args('tiny'))
    opt = trainer.build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device('cpu'))
    decayed = {id(p) for g in opt.param_groups if g['weight_decay'] == 0.1 for p in g['params']}
    plain = {id(p) for g in opt.param_groups if g['weight_decay'] == 0.0 for p in g['params']}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2) and (id(p) in plain) == (p.dim() < 2), name
    assert opt.defaults['betas'] == (0.9, 0.95) and opt.defaults['eps'] == 1e-8
    assert len(decayed) + len(plain) == len(list(model.parameters()))


def test_a_stage_sets_how_long_ranks_wait_for_each_other():
    """launch() joins the process group with the script's dist_timeout_min (grpo.py's ranks can be
    minutes apart), read after the config file and --key=value overrides."""
    script = ("import torch, trainer\nfrom torch.distributed import distributed_c10d as c10d\n"
              "dist_timeout_min = 60\n"
              "main = lambda rank, world_size, device: print(c10d._get_default_group()"
              "._get_backend(torch.device('cpu')).options._timeout)\n"
              "trainer.launch(main, globals(), ['dist_timeout_min'])\n")
    env = {**ENV, 'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1',
           'MASTER_PORT': str(29500 + os.getpid() % 1000)}
    out = subprocess.run([sys.executable, '-c', script, '--dist_timeout_min=42'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == '0:42:00', out.stderr


@pytest.mark.concept
def test_grad_accum_for_makes_the_global_batch():
    assert trainer.grad_accum_for(512, 4, 8) == 16 and trainer.grad_accum_for(512, 4, 64) == 2
    with pytest.raises(trainer.UsageError, match=r'global_batch_size=512 sequences is not a multiple of '
                                                 r'batch_size=3 x 8 ranks = 24'):
        trainer.grad_accum_for(512, 3, 8)


def shipped_config(script, path):
    """The settings `python script.py path` runs with: the script's defaults, then the config file."""
    module = importlib.import_module(script)
    settings = {k: getattr(module, k) for k in module.config_keys}
    configurator.apply_overrides(settings, list(settings), [str(path)])
    return settings


@pytest.mark.parametrize('gpus', [8, 64])
def test_every_shipped_config_runs_at_8_and_64_gpus(gpus):
    """Each config's global batch divides over the GPUs into its recipe's batch, and its data
    config writes enough validation tokens for eval_batches on every rank (else pretrain.py stops
    at once with a one-line error, see test_bad_inputs_fail_with_one_line)."""
    data_configs = {c['out_dir']: c for c in (shipped_config('data', p) for p in (ROOT / 'config').glob('data_*.py'))}
    recipe = {'moxin7b_phase1': 512, 'moxin7b_phase2': 512, 'moxin7b_phase3': 128, 'sft_tulu2': 128, 'sft_tulu3': 128}
    for name, global_batch in recipe.items():
        script = 'sft' if name.startswith('sft') else 'pretrain'
        c = shipped_config(script, ROOT / 'config' / f'{name}.py')
        accum = trainer.grad_accum_for(c['global_batch_size'], c['batch_size'], gpus)
        assert c['global_batch_size'] == c['batch_size'] * accum * gpus == global_batch, name
        if script == 'pretrain':  # a shard holds at least val_tokens; a window starts every block_size tokens
            val_windows = (data_configs[c['data_dir']]['val_tokens'] - 1) // c['block_size']
            assert val_windows >= c['eval_batches'] * c['batch_size'] * gpus, (name, val_windows)


class CountingLoader:
    """The loader side of a checkpoint: a position and state_dict()/load_state_dict()."""
    step = 0

    def state_dict(self):
        return {'step': self.step}

    def load_state_dict(self, state):
        self.step = state['step']


@pytest.mark.parametrize('keep_last, kept', [(1, [4]), (0, [1, 2, 3, 4])])  # keep_last=2: the reference run
def test_keep_last_keeps_the_newest_checkpoints_and_zero_keeps_all(tmp_path, keep_last, kept):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    model = Transformer(model_args('tiny', n_layers=1, vocab_size=64))
    optimizer = trainer.build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device('cpu'))
    run = trainer.Run(str(tmp_path), {}, keep_last=keep_last)
    try:
        run.start(model, optimizer, CountingLoader(), None, 4, 'test')
        for _ in range(4):
            run.step += 1
            run.save()
        run.pbar.close()
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == [f'step_{s:08d}' for s in kept]


@pytest.mark.parametrize('keep_last', [-1, 1.5])
def test_keep_last_must_be_a_count(tmp_path, keep_last):
    with pytest.raises(trainer.UsageError, match=f'keep_last={keep_last}: '):
        trainer.Run(str(tmp_path), {}, keep_last=keep_last)


# ----------------------------------------------------------------------------- runs

def test_run_learns_and_writes_final_checkpoint(reference):
    out, loss = reference
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[STEPS] < 0.85 * loss[1]
    records = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert {'lr', 'grad_norm', 'tokens_per_s', 'mfu'} <= set(records[1]) and any('val_loss' in r for r in records)
    ckpt = torch.load(out / 'final.pt', weights_only=True)
    assert ckpt['step'] == STEPS and ckpt['model_args']['n_layers'] == 2
    model, tokenizer = load_model(str(out / 'final.pt'))
    tokens = generate(model, [[3, 6, 9, 12]], max_new_tokens=5)[0]
    assert len(tokens) == 5 and all(0 <= t < 256 for t in tokens)
    # keep_last=2: only the two newest resumable checkpoints stay
    assert sorted(os.listdir(out / 'checkpoints')) == [f'step_{STEPS - 4:08d}', f'step_{STEPS:08d}']


def test_torchrun_two_ranks_matches_single_process(reference, data_dir, tmp_path):
    out, _ = reference
    # global batch 8 = batch 2 x 2 ranks x accumulation 2, derived
    args = [a for a in TINY if not a.startswith(('--batch_size', '--grad_accum'))] + ['--batch_size=2', '--global_batch_size=8']
    rc, stdout, stderr = run(args, tmp_path, data_dir, nproc=2)
    assert rc == 0, stderr[-3000:]
    assert 'FSDP2' in stdout and '2 x 2 accum x 2 ranks = 8 sequences' in stdout
    # every logged number of every step: loss, grad_norm, lr, tokens, val_loss
    fsdp, single = logged_numbers(tmp_path), logged_numbers(out)
    assert fsdp.keys() == single.keys() and {name for _, name in single} == {'loss', 'grad_norm', 'lr', 'tokens', 'val_loss'}
    assert_same_numbers(fsdp, single)
    # the gathered final weights are the same model
    a = torch.load(out / 'final.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'final.pt', weights_only=True)['model']
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)


def test_sigterm_then_sigkill_then_resume_is_bitwise_identical(reference, data_dir, tmp_path):
    _, loss = reference
    # SIGTERM: finish the step, write a checkpoint, exit 128 + 15
    p = run(TINY, tmp_path, data_dir, wait=False)
    wait_for(lambda: (tmp_path / 'log.jsonl').exists() and max(losses(tmp_path), default=0) >= 2, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    stopped_at = max(losses(tmp_path))
    assert stopped_at < STEPS
    assert (tmp_path / 'checkpoints' / f'step_{stopped_at:08d}' / 'meta.json').exists()
    # resume, then SIGKILL a few steps later: no chance to save anything
    p = run(TINY, tmp_path, data_dir, wait=False)
    wait_for(lambda: max(losses(tmp_path)) >= stopped_at + 3, p)
    p.kill()
    p.communicate()
    assert not (tmp_path / 'final.pt').exists(), "the run ended before the kill; nothing was tested"
    # resume=auto again: the losses, replayed steps included, equal the uninterrupted run's bit for bit
    rc, stdout, stderr = run(TINY, tmp_path, data_dir)
    assert rc == 0, stderr
    assert 'resumed from' in stdout
    assert losses(tmp_path) == loss


def test_a_second_sigterm_while_saving_is_ignored(data_dir, tmp_path):
    """Under SLURM a worker gets SIGTERM from SLURM and again from torchrun: the second one,
    here sent in the middle of writing the checkpoint, must not kill the save."""
    args = [*TINY, '--ckpt_interval=1000', f'--out_dir={tmp_path}', f'--data_dir={data_dir}']  # the stop's save only
    p = start('tests/during_save.py', ['sigterm', 'pretrain.py', *args], wait=False)
    wait_for(lambda: (tmp_path / 'log.jsonl').exists() and max(losses(tmp_path), default=0) >= 2, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    stopped_at = max(losses(tmp_path))
    assert stopped_at < STEPS and os.listdir(tmp_path / 'checkpoints') == [f'step_{stopped_at:08d}']
    meta = trainer.checkpoint_meta(tmp_path / 'checkpoints' / f'step_{stopped_at:08d}')
    assert meta['step'] == stopped_at


def test_kill_during_checkpoint_save_resumes_from_previous(reference, data_dir, tmp_path):
    _, loss = reference
    # tests/during_save.py freezes the save of step 8 after the shards are written, before meta.json
    p = start('tests/during_save.py', ['hang', '8', 'pretrain.py', *TINY, f'--out_dir={tmp_path}', f'--data_dir={data_dir}'],
              wait=False)
    step8 = tmp_path / 'checkpoints' / 'step_00000008'
    wait_for(lambda: (step8 / '.metadata').exists(), p)
    p.kill()
    p.communicate()
    assert not (step8 / 'meta.json').exists()
    assert (tmp_path / 'checkpoints' / 'step_00000004' / 'meta.json').exists()
    rc, stdout, stderr = run(TINY, tmp_path, data_dir)
    assert rc == 0, stderr
    assert 'resumed from' in stdout and 'step_00000004' in stdout
    assert losses(tmp_path) == loss


def test_init_from_checkpoint(reference, data_dir, tmp_path):
    out, loss = reference
    args = TINY + [f'--init_from={out / "final.pt"}', '--max_steps=2', '--warmup_steps=1', '--lr=1e-4']
    rc, stdout, stderr = run(args, tmp_path, data_dir)
    assert rc == 0, stderr
    assert 'init from' in stdout
    assert losses(tmp_path)[1] < 0.9 * loss[1]  # starts where the reference ended, not from scratch


def test_export_hf_holds_the_same_weights(reference, data_dir, tmp_path):
    out, _ = reference
    args = TINY + [f'--init_from={out / "final.pt"}', '--max_steps=1', '--export_hf=True']
    rc, stdout, stderr = run(args, tmp_path, data_dir)
    assert rc == 0, stderr
    from_pt, _ = load_model(str(tmp_path / 'final.pt'))
    from_hf, _ = load_model(str(tmp_path / 'hf'))
    idx = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(from_hf(idx)[0], from_pt(idx)[0], rtol=0.05, atol=0.05)  # bf16 safetensors
    assert Tokenizer.load(str(tmp_path / 'hf')).encode('def f(x):') == Tokenizer.load('mistral').encode('def f(x):')


def test_diverging_loss_stops_with_a_clear_message(data_dir, tmp_path):
    rc, stdout, stderr = run(TINY + ['--lr=1e9', '--warmup_steps=1', '--ckpt_interval=1'], tmp_path, data_dir)
    assert rc == 1
    assert 'training diverged' in stderr and 'newest good checkpoint is' in stderr


def test_bad_inputs_fail_with_one_line(data_dir, tmp_path):
    (tmp_path / 'empty').mkdir()
    cases = {
        'init_from=no/such/model.pt': ['--init_from=no/such/model.pt'],
        "unknown config key '--block_sise'": ['--block_sise=64'],
        'run `python data.py` first': [f'--data_dir={tmp_path / "empty"}'],
        "larger than the model's max_seq_len=128": ['--block_size=256'],
        'global_batch_size=10 sequences is not a multiple of batch_size=4 x 1 ranks = 4': ['--global_batch_size=10'],
        'cannot fill one batch of 200 on each of 1 ranks': ['--batch_size=200'],  # the validation split
        'windows of 17 tokens, eval_batches=50 x batch_size=4 x 1 ranks needs 200': ['--eval_batches=50'],
        'keep_last=-1: ': ['--keep_last=-1'],
    }
    procs = {}
    for expected, extra in cases.items():
        procs[expected] = subprocess.Popen(  # the later --data_dir wins
            [sys.executable, 'pretrain.py', *TINY, f'--out_dir={tmp_path / "out"}', f'--data_dir={data_dir}', *extra],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert_one_line_errors(procs, timeout=120)
    assert not (tmp_path / 'out' / 'checkpoints').exists()
