"""The dry run (dryrun.py) and the CUDA path of trainer.build_model it runs: memory against analytic
counts and a real 2-rank run, the verdict and its alternatives, compile together with activation
checkpointing, and checkpoint keys that no wrapper changes."""
import json
import math
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch._dynamo.utils import counters
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import dryrun
import grpo
import model as model_module
import trainer
from model import Transformer, model_args
from shard_probe import layout
from training_runs import ROOT, start
from weights import save_checkpoint

CONFIG = dict(seed=0, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0, block_size=32)


def simulate(gpus, batch_size=2, grad_accum=2, activation_checkpointing=False, args=None, **config):
    setup = dryrun.Setup(gpus, batch_size, grad_accum, activation_checkpointing)
    return dryrun.simulate(args or model_args('tiny'), {**CONFIG, **config}, setup)


def n_params(args):
    return sum(p.numel() for p in Transformer(args).parameters())


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize('gpus', [2, 8])
def test_sharded_state_is_the_analytic_count(gpus):
    # tiny's dimensions all divide by 8, so every rank holds exactly 1/gpus of each tensor
    args = model_args('tiny')
    P, tensors = n_params(args), len(list(Transformer(args).parameters()))
    held = simulate(gpus).at_update
    assert held['Sharded Param'] == 4 * P // gpus  # fp32 shards
    assert held['Sharded Grad'] == 4 * P // gpus  # fp32, reduce-scattered
    # AdamW: two fp32 moments per weight, and a float32 step count per tensor
    assert held['OptState'] == 2 * 4 * P // gpus + 4 * tensors


def test_activation_checkpointing_keeps_far_fewer_activations():
    args = model_args('tiny', n_layers=4)
    kept = {ac: simulate(2, batch_size=4, grad_accum=1, activation_checkpointing=ac, args=args, block_size=64).peak
            for ac in (False, True)}
    assert kept[True]['Activation'] < kept[False]['Activation'] / 3


class DropsLastPosition(torch.nn.Module):
    """A broken activation-checkpointing wrapper: the block's output comes back one position short."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, *args):
        return self.block(x, *args)[:, :-1]


def test_the_dry_run_runs_the_real_build_path(monkeypatch):
    """No copy: a shape mistake put into trainer.build_model's wrapping fails the dry run. (Fake
    tensors check shapes, not dtypes: a matmul of float32 by bf16 passes them.)"""
    assert simulate(2, activation_checkpointing=True).peak['Total'] > 0
    monkeypatch.setattr(trainer, 'checkpoint_wrapper', DropsLastPosition)
    with pytest.raises(RuntimeError, match='broadcast'):
        simulate(2, activation_checkpointing=True)


def linear_params(args):
    """The nn.Linear weights' parameter count of a model of this shape: the part grpo.py's reference keeps in bf16."""
    with torch.device('meta'):
        return sum(m.weight.numel() for m in Transformer(args).modules() if isinstance(m, torch.nn.Linear))


@pytest.fixture(scope='module')
def real_two_ranks(tmp_path_factory):
    """tests/shard_probe.py under torchrun, 2 ranks (gloo): rank 0's parameter layout, bytes and losses."""
    out = tmp_path_factory.mktemp('probe') / 'rank0.json'
    rc, _, err = start('tests/shard_probe.py', [str(out)], nproc=2)
    assert rc == 0, err
    real = json.loads(out.read_text())
    for key in ('layout', 'reference_layout'):
        real[key] = {k: [p, s, d] for k, (p, s, d) in real[key].items()}
    return real


def test_dry_run_matches_a_real_two_rank_run(real_two_ranks):
    real = real_two_ranks
    with dryrun.fake_ranks(2) as fsdp:
        fake = trainer.build_model(model_args('tiny'), torch.device('cpu'), 0, fsdp=fsdp)
        assert layout(fake) == real['layout']
    held = simulate(2).at_update
    assert (held['Sharded Param'], held['OptState']) == (real['params'], real['optimizer'])
    # and the real run trains compiled, checkpointed, sharded blocks: one graph for all, the same loss
    assert (real['graphs'], real['graph_breaks']) == (1, 0)
    assert real['compiled_loss'] == pytest.approx(real['loss'], rel=1e-5)


def test_grpo_reference_in_bf16_gives_the_policys_logprobs_in_half_the_memory(real_two_ranks):
    """Where the forward computes in bf16 (FSDP2's param_dtype on CUDA, emulated on 2 gloo ranks), a
    reference whose matmul weights are stored in bf16 gives exactly the log-probs of the fp32 policy."""
    real = real_two_ranks
    assert real['reference_max_diff'] == 0
    linear = linear_params(model_args('tiny'))
    # each rank holds half of every weight; the matmul weights take 2 bytes instead of 4, the embedding and norms 4
    assert real['policy_bytes'] - real['reference_bytes'] == 2 * linear // 2


# ----------------------------------------------------------------------------- the report

def one_table(out):
    assert len(re.findall(r'^\| --- \|', out, re.M)) == 1, out
    return out


def test_a_run_that_fits_says_so(capsys):
    config = {**CONFIG, 'batch_size': 1, 'grad_accum': 1, 'activation_checkpointing': False, 'compile': False,
              'gpus': 2, 'gpu_memory_gb': 80.0, 'gpu': 'H100', 'mfu': 0.4}
    dryrun.dry_run(model_args('tiny'), config, max_steps=200)
    out = one_table(capsys.readouterr().out)
    assert 'the configured run fits' in out and 'would fit with' not in out and 'try: ' not in out
    assert 'whole run: 200 steps' in out and 'GPU-hours' in out


def test_a_run_that_fits_with_checkpointing_says_what_turning_it_off_saves(capsys):
    config = {**CONFIG, 'batch_size': 1, 'grad_accum': 1, 'activation_checkpointing': True, 'compile': False,
              'gpus': 2, 'gpu_memory_gb': 80.0, 'gpu': 'H100', 'mfu': 0.4}
    dryrun.dry_run(model_args('tiny'), config, max_steps=200)
    out = capsys.readouterr().out
    assert 'the configured run fits; it also fits with: 2 GPUs, 1 x 1 accum, AC off' in out
    # by hand, tiny at 32 tokens: per block 64 x 16 x (2 x 4 + 2 x 2) attention + 3 x 64 x 128 SwiGLU = 36,864
    # weights, 2 blocks, head 256 x 64 = 16,384; attention reads min(32, window 8) keys: 12 x 2 x 4 x 16 x 8
    useful = 6 * (2 * 36_864 + 16_384) + 12 * 2 * 4 * 16 * 8
    recompute = (useful - 6 * 16_384) / 3  # the blocks' forward again
    assert useful == 552_960 and dryrun.recompute_flops_per_token(model_args('tiny'), 32) == recompute == 151_552
    with_ac = 64 * useful / (2 * 989e12 * 0.4)  # 1 x 1 x 2 GPUs x 32 tokens
    assert f"time/step {with_ac:.3g} -> {with_ac * useful / (useful + recompute):.3g} s (MFU 40% -> 51%)" in out
    assert 'set activation_checkpointing=False' in out


def test_a_run_that_does_not_fit_names_what_would_and_tried_it():
    # on one GPU, sized so that the weights, gradients and AdamW state alone leave no room
    one_gpu = simulate(1, batch_size=1, grad_accum=1, block_size=16).peak['Total']
    gib = 0.7 * one_gpu / dryrun.GIB
    rc, out, err = start('dryrun.py', ['pretrain.py', '--preset=tiny', '--batch_size=1', '--block_size=16', '--gpus=1',
                                       f'--gpu_memory_gb={gib}'])
    assert rc == 0, err
    one_table(out)
    assert 'the configured run does NOT fit' in out
    fix = re.search(r'it would fit with: (.*)', out).group(1)
    assert re.search(r'\b(2|4) GPUs', fix), out  # more GPUs shard the state further
    columns = out.splitlines()[2].split(' | ')
    assert any(c.startswith('try: ') and re.search(r'\b(2|4) GPUs', c) for c in columns), out  # tried, in the table


@pytest.mark.parametrize('key, value', [('gpus', 0), ('gpu', 'TPU v5'), ('mfu', 1.5)])
def test_bad_dry_run_settings_name_the_setting(key, value):
    config = {**CONFIG, 'batch_size': 1, 'grad_accum': 1, 'activation_checkpointing': False, 'compile': False,
              'gpus': 2, 'gpu_memory_gb': 80.0, 'gpu': 'H100', 'mfu': 0.4, key: value}
    with pytest.raises(trainer.UsageError, match=f'^{key}='):
        dryrun.dry_run(model_args('tiny'), config, max_steps=10)


# ----------------------------------------------------------------------------- compile with activation checkpointing

@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile as build_model calls it, with a backend that compiles in seconds on a CPU."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, **kw: compile_module(self, backend='aot_eager', **kw))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compile_traces_checkpointed_blocks_as_one_graph(eager_compile):
    args = model_args('tiny', n_layers=3)
    plain = trainer.build_model(args, torch.device('cpu'), 0)
    both = trainer.build_model(args, torch.device('cpu'), 0, compile=True, activation_checkpointing=True)
    x = torch.randint(0, args.vocab_size, (2, 16))
    losses = [trainer.lm_loss(m, (x, x))[0] for m in (plain, both)]
    for loss in losses:
        loss.backward()
    assert counters['stats']['unique_graphs'] == 1  # every block shares one captured graph
    assert not counters['graph_break']
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(both.layers[0].attention.wq.weight.grad, plain.layers[0].attention.wq.weight.grad)


def test_batches_of_many_lengths_compile_two_graphs(eager_compile):
    """sft.py and dpo.py batches have a length each (conversations are padded to the longest of
    their micro-batch): after the first length, Dynamo marks the length dynamic and one more graph
    serves every other length, so compile=True costs two compilations, not one per length."""
    model = trainer.build_model(model_args('tiny', sliding_window=None), torch.device('cpu'), 0, compile=True,
                                activation_checkpointing=True)
    for T in (17, 40, 23, 64, 31, 50, 9, 72):
        x = torch.randint(0, 256, (2, T))
        trainer.lm_loss(model, (x, x))[0].backward()
    assert counters['stats']['unique_graphs'] == 2 and not counters['graph_break']


def test_a_graph_break_is_an_error_not_a_silent_eager_block(eager_compile, monkeypatch):
    forward = model_module.Block.forward

    def breaks(self, *args):
        torch._dynamo.graph_break()
        return forward(self, *args)
    monkeypatch.setattr(model_module.Block, 'forward', breaks)
    model = trainer.build_model(model_args('tiny'), torch.device('cpu'), 0, compile=True, activation_checkpointing=True)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        model(torch.randint(0, 256, (1, 8)))


def test_wrappers_leave_checkpoint_keys_unchanged(eager_compile, tmp_path):
    args = model_args('tiny')
    names = set(Transformer(args).state_dict())
    model = trainer.build_model(args, torch.device('cpu'), 0, compile=True, activation_checkpointing=True)
    assert set(model.state_dict()) == names
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    save_checkpoint(str(tmp_path / 'final.pt'), model, 'mistral', state_dict=full)  # what Run.finish writes
    assert set(torch.load(tmp_path / 'final.pt', weights_only=True)['model']) == names
    dcp.save({'model': get_model_state_dict(model)}, checkpoint_id=str(tmp_path / 'dcp'), no_dist=True)  # Run.save
    saved = dcp.FileSystemReader(str(tmp_path / 'dcp')).read_metadata().state_dict_metadata
    assert {k.removeprefix('model.') for k in saved} == names


@pytest.mark.parametrize('argv', [
    ['pretrain.py', 'config/moxin7b_phase1.py', '--gpus=64'],
    ['pretrain.py', 'config/moxin7b_phase1.py', '--gpus=16', '--gpu_memory_gb=40', '--gpu=A100', '--mfu=0.35',
     '--grad_accum=8'],
    ['sft.py', 'config/sft_tulu3.py', '--gpus=8', '--dataset_conversations=939343'],
    ['dpo.py', 'config/dpo_tulu3.py', '--gpus=8', '--dataset_pairs=271409'],
    ['grpo.py', 'config/grpo_deepscaler.py', '--gpus=64', '--max_new_tokens=24576', '--block_size=25600',
     '--group_size=16']])
def test_7b_dry_run_commands_read_the_stage_settings(argv, monkeypatch):
    """The 7B dry runs take minutes; here the settings they simulate are checked to be the config's."""
    monkeypatch.chdir(ROOT)
    stage, settings = dryrun.stage_settings(argv)
    assert stage == argv[0][:-3] and settings['gpus'] == int(argv[2].split('=')[1])
    # the config file's, not the stage's defaults (and the 24k phase's overrides)
    assert settings['block_size'] == {'pretrain': 2048, 'sft': 4096, 'dpo': 2048, 'grpo': 25600}[stage]
    assert settings['micro_batch_tokens' if stage == 'grpo' else 'global_batch_size'] == {
        'pretrain': 512, 'sft': 128, 'dpo': 128, 'grpo': 32768}[stage]
    shape = settings['preset'] if stage == 'pretrain' else settings['shape']
    assert dryrun.preset_args(shape, {}).n_layers == 36
    assert trainer.datasheet_peak(settings['gpu']) is not None


@pytest.mark.parametrize('argv, message', [
    (['eval.py'], 'usage: python dryrun.py'),
    (['pretrain.py', '--gpu_count=8'], "unknown config key '--gpu_count'"),
    (['sft.py', 'config/sft_tulu3.py', '--dry_run'], "unknown config key '--dry_run'")])
def test_a_bad_dry_run_command_is_one_line(argv, message):
    rc, out, err = start('dryrun.py', argv)
    assert rc == 2 and err.startswith('error: ') and message in err and len(err.strip().splitlines()) == 1, err


def test_sft_steps_count_as_sft_counts_them():
    # 939,343 conversations over 64 GPUs x 1 per batch: 14,677 batches per epoch; accumulation 128 / 64 = 2
    config = {'gpus': 64, 'global_batch_size': 128, 'batch_size': 1, 'grad_accum': 1, 'epochs': 2,
              'dataset_conversations': 939_343}
    assert dryrun.sft_steps(config) == math.ceil(2 * 14_677 / 2)


# ----------------------------------------------------------------------------- DPO and GRPO

def tiny_stage(stage, *overrides):
    """The stage's own settings (its defaults, as stage_settings reads them) on the tiny shape, 2 GPUs."""
    return dryrun.stage_settings([f'{stage}.py', '--shape=tiny', '--gpus=2', '--compile=False', *overrides])[1]


@pytest.fixture
def built(monkeypatch):
    """What the dry run makes, in order: the models it builds, its simulations, GRPO's memory columns."""
    seen = {'models': [], 'simulated': [], 'memory': []}

    def spy(name, key, module=dryrun):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **kw: seen[key].append(real(*a, **kw)) or seen[key][-1])
    spy('build_model', 'models')
    spy('build_model', 'models', grpo)  # the reference: grpo.build_reference
    spy('simulate', 'simulated')
    spy('grpo_memory', 'memory')
    return seen


def table_rows(out):
    """{row label: cell} of the one-column table in out."""
    return {cells[1].strip(): cells[2].strip() for line in one_table(out).splitlines()
            if line.startswith('| ') and len(cells := line.split('|')) == 4}


def test_grpo_dry_run_rows_layout_and_the_held_memory_by_hand(built, capsys, real_two_ranks):
    # tiny at 2 GPUs: 4 prompts / 2 x group 4 = 8 completions per rank, prompts of up to 24 - 16 = 8 tokens
    config = tiny_stage('grpo', '--block_size=24', '--max_new_tokens=16', '--prompts_per_step=4', '--group_size=4',
                        '--micro_batch_tokens=64', '--activation_checkpointing=False')
    dryrun.grpo_dry_run(model_args('tiny'), config)
    out = capsys.readouterr().out
    (memory,) = built['memory']
    assert sum(memory.get(k, 0) for kinds in dryrun.RL_KINDS.values() for k in kinds) == memory['Total']
    rows = table_rows(out)
    assert list(rows)[2:-4] == list(dryrun.RL_KINDS)
    assert rows['**total**, every row at once'] == f"**{dryrun._size(memory['Total'])}**"
    # the verdict's peak: the larger of the two phases, the KV cache held while generating only
    assert memory['Updating'] == memory['Total'] - memory['KV cache'] > memory['Generating']
    P = n_params(model_args('tiny'))
    assert memory['Rollout copy'] == 2 * P  # bf16, whole, on every rank
    # 8 rows x 2 layers x (K and V) x 2 kv heads x 8 slots (the window: 24 > 8) x head_dim 16 x 2 bytes
    assert memory['KV cache'] == 8 * 2 * 2 * 2 * 8 * 16 * 2
    linear = linear_params(model_args('tiny'))
    # half of each weight a rank: bf16 matmul weights, fp32 embedding and norms, as grpo.py builds it on CUDA
    assert memory['Reference'] == (2 * linear + 4 * (P - linear)) // 2
    # the policy and the reference, as built in the simulation, are laid out as a real 2-rank run lays them out
    policy, reference = built['models']
    assert layout(policy) == real_two_ranks['layout'] and layout(reference) == real_two_ranks['reference_layout']
    assert not any(p.requires_grad for p in reference.parameters())


def test_kv_cache_is_the_rolling_buffer_or_the_block():
    args = model_args('tiny')  # window 8
    assert dryrun.kv_cache_bytes(args, 5, 6) == 5 * 2 * 2 * 2 * 6 * 16 * 2  # 6 tokens fit in the window
    assert dryrun.kv_cache_bytes(args, 5, 100) == 5 * 2 * 2 * 2 * 8 * 16 * 2  # the window's 8 slots


@pytest.mark.parametrize('budget, block', [(64, 24), (16, 24), (100, 31), (23, 24)])
def test_the_simulated_micro_batch_is_the_fullest_grpo_packs(budget, block):
    rows, length = dryrun.fullest_micro_batch(budget, block)
    assert length <= block - 1 and (rows * length <= budget or rows == 1)
    completion = ([1, 2], [3] * (length - 1), 0.5)  # x drops the last token: length = prompt + completion - 1
    first = grpo.micro_batches([completion] * (rows + 1), budget, pad_id=0)[0]
    assert first[0].shape == (rows, length)  # every row that fits, and not one more


def test_decode_time_is_the_hand_count():
    args = model_args('tiny')
    matmul = 2 * 36_864 + 16_384  # tiny's matmul weights, counted in test_a_run_that_fits_with_checkpointing...
    weights = 2 * matmul  # bf16 bytes
    per_slot = 2 * 2 * 2 * 16 * 2  # layers x (K, V) x kv heads x head_dim x bf16
    filled = [min(2 + t, 8) for t in range(1, 9)]  # 2-token prompts, 8 new tokens, a window of 8 slots
    memory_bound = sum(weights + 3 * f * per_slot for f in filled) / 1e9
    assert dryrun.decode_seconds(args, 3, 2, 8, 1e9, 1e15) == pytest.approx(memory_bound)
    # compute-bound: per row 2 FLOPs per matmul weight + 4 x layers x heads x head_dim per key read
    compute_bound = sum(3 * (2 * matmul + 4 * 2 * 4 * 16 * f) for f in filled) / 1e6
    assert dryrun.decode_seconds(args, 3, 2, 8, 1e15, 1e6) == pytest.approx(compute_bound)


def test_grpo_step_time_is_the_hand_count(capsys):
    config = tiny_stage('grpo', '--block_size=24', '--max_new_tokens=16', '--prompts_per_step=4', '--group_size=4',
                        '--max_steps=10')
    args, setup = model_args('tiny'), dryrun.RLSetup(2, 64, False, 8)
    print(dryrun._grpo_arithmetic(args, config, setup))
    out = capsys.readouterr().out
    flops_per_s = 989e12 * 0.4
    per_token = lambda T: 6 * (2 * 36_864 + 16_384) + 12 * 2 * 4 * 16 * min(T, 8)
    decode = dryrun.decode_seconds(args, 8, 8, 16, 3.35e12, flops_per_s)
    prefill = 2 * 8 * per_token(8) / 3 / flops_per_s  # 2 prompts of 8 tokens, each prefilled once
    tokens = 8 * 23  # 8 completions of 8 + 16 - 1 tokens
    step = decode + prefill + 2 * tokens * per_token(23) / 3 / flops_per_s + tokens * per_token(23) / flops_per_s
    assert f"time/step: {dryrun._number(step)} s" in out
    assert f"whole run: 10 steps: {dryrun._number(10 * step / 3600)} hours on 2 GPUs" in out
    # generated 3 rows at a time: 3 decode calls (3 + 3 + 2 rows, each timed as 3), the rest unchanged
    print(dryrun._grpo_arithmetic(args, config, dryrun.RLSetup(2, 64, False, 3)))
    chunked = step - decode + 3 * dryrun.decode_seconds(args, 3, 8, 16, 3.35e12, flops_per_s)
    assert f"time/step: {dryrun._number(chunked)} s" in capsys.readouterr().out


def test_a_grpo_run_that_does_not_fit_names_what_would(built, capsys):
    # 512 prompts x 8 samples on 2 GPUs: 2,048 completions a rank, whose KV cache is what does not fit
    config = tiny_stage('grpo', '--block_size=24', '--max_new_tokens=16', '--prompts_per_step=512', '--group_size=8',
                        '--micro_batch_tokens=64', '--activation_checkpointing=True', '--kl_coef=0',
                        '--rollout_rows=2048')  # all of them at once
    args = model_args('tiny')
    dryrun.grpo_dry_run(args, config)
    held, kv_row = built['memory'][0], dryrun.kv_cache_bytes(args, 1, 24)
    assert held['Generating'] > held['Updating']
    without_cache = held['Generating'] - held['KV cache']
    rows = 8 * math.ceil((held['Updating'] - without_cache) / kv_row / 8 + 1)  # whole groups; the update fits too
    room = without_cache + rows * kv_row + kv_row / 2
    dryrun.grpo_dry_run(args, {**config, 'gpu_memory_gb': room / dryrun.HEADROOM / dryrun.GIB})
    out = capsys.readouterr().out.split('(dry run: ')[1]
    assert 'the configured run does NOT fit' in out
    assert 'reference, sharded (frozen) | 0.00 MiB' in out  # kl_coef=0: no reference
    fix = re.search(r'it would fit with: (.*)', out).group(1)
    assert f'2 GPUs, micro-batches of 64 tokens, AC on, {rows} completions generated at once' in fix
    # and each other one-change setting was tried, in a column of the table
    assert 'try: 2 GPUs, micro-batches of 16 tokens' in out
    assert re.search(r'try: \d+ GPUs, micro-batches of 64 tokens, AC on, \d+ completions', out)


def test_dpo_dry_run_rows_layout_and_arithmetic(built, capsys, real_two_ranks):
    config = tiny_stage('dpo', '--block_size=32', '--batch_size=2', '--grad_accum=2', '--global_batch_size=0',
                        '--activation_checkpointing=False', '--dataset_pairs=1000', '--heldout_pairs=100',
                        '--epochs=1.0')
    dryrun.dpo_dry_run(model_args('tiny'), config)
    out = capsys.readouterr().out
    (policy,) = built['models']  # the reference is never built: its log-probs are precomputed
    assert layout(policy) == real_two_ranks['layout']
    rows = table_rows(out)
    assert list(rows)[2:-2] == list(dryrun.KINDS)
    (measured,) = built['simulated']
    assert sum(measured.peak.get(k, 0) for kinds in dryrun.KINDS.values() for k in kinds) == measured.peak['Total']
    assert 'reference model: no memory while training' in out
    # a micro-batch of 2 pairs is 4 conversations: 4 x 2 accum x 2 GPUs = 16 sequences of 32 tokens per step
    assert 'tokens/step: 4 x 2 accum x 2 GPUs = 16 sequences x 32 = 512' in out
    # 900 training pairs in groups of 2: 450 groups, 225 a rank, 2 per step: 113 steps
    assert 'whole run: 113 steps' in out
    useful = 6 * (2 * 36_864 + 16_384) + 12 * 2 * 4 * 16 * 8
    reference = 2 * 1000 * 32 * useful / 3 / (2 * 989e12 * 0.4)
    assert f"{dryrun._number(reference / 60)} min on 2 GPUs" in out


def test_dpo_steps_count_as_dpo_counts_them():
    # Tulu 3's 271,409 pairs less 1,000 held out, 1 a micro-batch, on 8 GPUs: 33,801 each; 128 / 8 = 16 accumulated
    config = {'gpus': 8, 'global_batch_size': 128, 'batch_size': 1, 'grad_accum': 1, 'epochs': 1.0,
              'dataset_pairs': 271_409, 'heldout_pairs': 1000}
    assert dryrun.dpo_steps(config) == math.ceil(33_801 / 16) == 2113


def test_every_gpu_with_a_peak_has_a_bandwidth():
    assert list(dryrun.GPU_BANDWIDTH) == list(trainer.GPU_PEAK_FLOPS)
