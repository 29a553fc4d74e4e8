"""
The dry run: a training stage's own code path on this CPU, simulated over N GPUs: does it fit in
memory, and what will the run cost? Put it in front of the training command:

    python dryrun.py pretrain.py config/moxin7b_phase1.py --gpus=64
    python dryrun.py sft.py config/sft_tulu3.py --gpus=8 --dataset_conversations=939343
    python dryrun.py pretrain.py config/moxin7b_phase1.py --gpus=16 --gpu_memory_gb=40 --gpu=A100 --mfu=0.35
    python dryrun.py dpo.py config/dpo_tulu3.py --gpus=8 --dataset_pairs=271409
    python dryrun.py grpo.py config/grpo_deepscaler.py --gpus=8

Its own settings are below (gpus, gpu_memory_gb, gpu, mfu, and for sft, dpo and grpo the shape and
for sft and dpo the dataset's size); every other --key=value, and the config file, set the stage's
settings as they would for the real run. It reads no data or weights and writes nothing.

How: torch.distributed's fake process group of N ranks (backend "fake": every collective returns
at once) and FakeTensorMode (tensors with shapes and dtypes but no storage). Under both, the stage's
own trainer.build_model takes its CUDA path (the meta device, activation checkpointing, fully_shard
per block then the root with bf16 compute and fp32 reduction, the shards materialised and
initialised), trainer.build_optimizer makes the AdamW state, and trainer.train_step runs two steps
on random tokens of the configured shape; then the checkpoint's state-dict plan is made (what DCP
would write). torch.distributed._tools' FSDPMemTracker counts every tensor of rank 0 by kind as it
is created and freed; the peak is taken over the second step, when the optimizer state exists.
Each micro-batch of a step needs the same memory, so a step runs at most two of them (the second
one runs with the first's gradients held, as the rest would).

What it cannot see: the CUDA context, NCCL's buffers and the caching allocator's fragmentation
(hence the 10% headroom in the verdict), and compiled kernels (the memory is measured eagerly, as
torchtitan's estimator does: a compiled block saves a different set of tensors for backward).
Time is arithmetic, not measured: FLOPs per token (trainer.flops_per_token, the count the MFU in
the training log uses) over the GPU's datasheet bf16 peak (trainer.GPU_PEAK_FLOPS) at an assumed MFU.

DPO is simulated as SFT is, a micro-batch holding each pair's chosen and rejected conversations. GRPO
adds what a step holds besides the update: the frozen reference (built and sharded in the simulation
as grpo.py builds it), the unsharded bf16 rollout copy on every rank, and the KV cache of the rank's
rollout batch (model.KVCache's own arithmetic); its rollouts are timed from decode arithmetic: each
new token reads the weights and the batch's cache once, at the GPU's datasheet HBM bandwidth.
"""
import importlib
import math
import sys
import time
import warnings
from contextlib import contextmanager
from unittest.mock import patch
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import dpo
import grpo
from configurator import ConfigError, apply_overrides
from model import KVCache, Transformer
from trainer import (GPU_PEAK_FLOPS, UsageError, build_model, build_optimizer, datasheet_peak, flops_per_token,
                     fsdp_precision, grad_accum_for, lm_loss, preset_args, train_step)

# ----------------------------------------------------------------------------- the dry run's own settings
gpus = 8                       # GPUs to simulate
gpu_memory_gb = 80.0           # memory per GPU, GiB
gpu = 'H100'                   # whose datasheet bf16 peak (trainer.GPU_PEAK_FLOPS) the time is computed for
mfu = 0.4                      # the model FLOPs utilisation assumed for time and GPU-hours
shape = 'moxin-7b'             # sft, dpo, grpo: init_from's shape (a model.PRESETS name), since no weights are read
dataset_conversations = 0      # sft: the dataset's conversations, for the whole run's time (0: per step only)
dataset_pairs = 0              # dpo: the dataset's preference pairs, for the whole run's time (0: per step only)
config_keys = ['gpus', 'gpu_memory_gb', 'gpu', 'mfu', 'shape', 'dataset_conversations', 'dataset_pairs']
STAGES = ('pretrain', 'sft', 'dpo', 'grpo')

# HBM bandwidth from the vendors' datasheets (NVIDIA H100: SXM 3.35 TB/s, NVL 3.9, PCIe 2.0; H200 4.8;
# A100 80GB SXM 2.039), matched by name as trainer.GPU_PEAK_FLOPS is: a decode step reads every weight
GPU_BANDWIDTH = {'H100 PCIe': 2.0e12, 'H100 NVL': 3.9e12, 'H100': 3.35e12, 'H200': 4.8e12, 'A100': 2.039e12}

GIB = 2 ** 30
HEADROOM = 0.9  # of gpu_memory_gb the tracked tensors may use: the rest is CUDA context, NCCL, fragmentation

# the table's rows: FSDPMemTracker's kinds of memory, grouped
KINDS = {'parameters, sharded (fp32)': ['Sharded Param'],
         'parameters, unsharded (bf16 blocks)': ['Unsharded Param'],
         'gradients': ['Sharded Grad', 'Unsharded Grad'],
         'optimizer state (AdamW, fp32)': ['OptState'],
         'activations': ['Activation', 'Inputs'],
         'collective buffers': ['All Gather', 'Reduce Scatter'],
         'temporaries': ['Temp', 'Buffer']}


@dataclass(frozen=True)
class Setup:
    """What decides a rank's memory: the GPUs, the micro-batch, accumulation, checkpointing."""
    gpus: int
    batch_size: int
    grad_accum: int
    activation_checkpointing: bool


def random_tokens(batch_size, block_size, vocab_size):
    """A pre-training or SFT micro-batch: input ids and targets [batch_size, block_size]."""
    shape = (batch_size, block_size)
    return torch.randint(0, vocab_size, shape), torch.randint(0, vocab_size, shape)


class _AnyScalar(TorchDispatchMode):
    """Fake tensors have no values, but train_step reads a few (loss, grad norm, counts) as Python
    numbers: answer 1 for each. Nothing the dry run reports depends on them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


def _every_position_logprobs(self, idx, targets):
    """Transformer.token_logprobs with the head at every position, through forward(): fake tensors
    cannot make the data-dependent selection of the scored positions, so the dry run counts this
    upper bound (and FSDPMemTracker follows the root module through forward() alone)."""
    logits, _ = self(idx)
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction='none').view_as(targets)


@contextmanager
def fake_ranks(gpus):
    """Rank 0 of a fake process group of `gpus` ranks, under FakeTensorMode. -> the `fsdp` argument
    of trainer.build_model: the device mesh over the ranks and the CUDA precision policy."""
    dist.init_process_group('fake', rank=0, world_size=gpus, store=FakeStore())
    try:
        mesh = init_device_mesh('cpu', (gpus,))  # before FakeTensorMode: a mesh needs real rank numbers
        with FakeTensorMode(), warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='DTensor random operators')  # values do not matter here
            yield mesh, fsdp_precision('cuda')
    finally:
        dist.destroy_process_group()


@dataclass
class Measurement:
    peak: dict       # {kind: bytes} of rank 0 at its peak, and 'Total'
    at_update: dict  # {kind: bytes} just before the optimizer's update: every gradient and state held
    plan: dict       # the checkpoint: {'model' / 'optim': (tensors, bytes over all ranks)}
    reference: int = 0  # bytes of the frozen reference's shards (GRPO), held beside what the tracker counts


def simulate(args, config, setup, loss_fn=lm_loss, make_batch=random_tokens, reference=False):
    """Two training steps of rank 0 of setup.gpus, on fake tensors. -> Measurement.
    reference: also build the frozen reference model as grpo.py does, and count its shards."""
    # imported here: it imports torch._inductor, seconds that no training run should wait for
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    # the device is the CPU (a CPU build cannot run autograd on fake CUDA tensors); precision is CUDA's
    device = torch.device('cpu')
    with fake_ranks(setup.gpus) as fsdp, patch.object(Transformer, 'token_logprobs', _every_position_logprobs), \
            patch('trainer.register_fsdp_forward_method'):
        model = build_model(args, device, config['seed'], None, False, setup.activation_checkpointing, fsdp)
        frozen = 0
        if reference:  # after the policy, as grpo.py builds it
            ref = grpo.build_reference(args, device, config['seed'], None, fsdp, dtype=torch.bfloat16)  # as on CUDA
            frozen = sum(p.to_local().nbytes for p in ref.parameters())
        optimizer = build_optimizer(model, config['lr'], config['weight_decay'], config['betas'], config['eps'],
                                    torch.device('cuda'))

        def step(loss_fn):
            batches = [make_batch(setup.batch_size, config['block_size'], args.vocab_size)
                       for _ in range(min(setup.grad_accum, 2))]
            with _AnyScalar():
                train_step(model, optimizer, batches, loss_fn, config['lr'], config['grad_clip'])
        step(loss_fn)
        # a fresh tracker for step 2: step 1's peak includes creating the optimizer state
        tracker = FSDPMemTracker(model, optimizer)
        at_update = {}
        optimizer.register_step_pre_hook(lambda *_: at_update.update(_snapshot(tracker, 'current')))

        def tracked_loss(model, batch):
            tracker.reset_mod_stats()  # it allows one forward per module between resets
            return loss_fn(model, batch)
        with tracker:
            step(tracked_loss)
        return Measurement(_snapshot(tracker, 'peak'), at_update, checkpoint_plan(model, optimizer), frozen)


def _snapshot(tracker, which):
    (by_kind,) = tracker.get_tracker_snapshot(which).values()  # one device
    return {getattr(kind, 'value', kind): n for kind, n in by_kind.items()}


def checkpoint_plan(model, optimizer):
    """What Run.save hands DCP: {'model': (tensors, bytes), 'optim': (...)} over all ranks. The keys
    must be the model's own names: no wrapper's prefix may leak into a checkpoint."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    leaked = [k for k in model_sd if '_checkpoint_wrapped_module' in k or '_orig_mod' in k]
    if leaked:
        raise RuntimeError(f"checkpoint keys carry a wrapper's prefix: {leaked[:3]}")

    def size(tree):
        tensors = [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]
        # a DTensor's numel is the full tensor's: the bytes all ranks write together
        return len(tensors), sum(t.numel() * t.element_size() for t in tensors)
    return {'model': size(model_sd), 'optim': size(optim_sd)}


def dry_run(args, config, max_steps, loss_fn=lm_loss, make_batch=random_tokens):
    """Simulate the configured run on config['gpus'] GPUs and print one table: the per-GPU
    peak by kind against gpu_memory_gb, and, when it does not fit, the settings that would, each
    tried; then the run's arithmetic (tokens, FLOPs, time, GPU-hours at the assumed MFU).
    max_steps: the run's optimizer steps (0 or None if unknown: then the time per step alone)."""
    t0 = time.time()
    config, configured, results = _simulate_setups(args, config, loss_fn, make_batch)
    print(_arithmetic(args, config, configured, max_steps, results[configured].plan))
    if _fits_without_checkpointing(config, configured, results):
        print(_without_checkpointing(args, config, configured, max_steps))
    print(f"(dry run: {len(results)} simulation(s) on this CPU in {time.time() - t0:.0f}s; nothing read or written)")


def check_dry_run_settings(config):
    """The dry run's own settings, before anything is simulated: a UsageError naming the bad one."""
    if dist.is_initialized():
        raise UsageError("dryrun.py: run it as one plain process (python, not torchrun); it simulates the GPUs itself")
    gpus, gpu, mfu = config['gpus'], config['gpu'], config['mfu']
    if not (isinstance(gpus, int) and gpus >= 1):
        raise UsageError(f"gpus={gpus!r}: the number of GPUs to simulate, an integer >= 1")
    if datasheet_peak(gpu) is None:
        raise UsageError(f"gpu={gpu!r}: no datasheet peak for it (known: {', '.join(GPU_PEAK_FLOPS)})")
    if not 0 < mfu <= 1:
        raise UsageError(f"mfu={mfu!r}: the fraction of the GPU's peak FLOP/s the run achieves, in (0, 1]")


def _simulate_setups(args, config, loss_fn, make_batch):
    """The configured run, the settings that would fit when it does not, and, when it fits with activation
    checkpointing, the same without; prints their table. -> (config with grad_accum for the GPUs, the
    configured Setup, {Setup: Measurement})."""
    check_dry_run_settings(config)
    if config.get('global_batch_size'):  # the recipe's global batch on the simulated GPUs, as a real run derives it
        config = {**config, 'grad_accum': grad_accum_for(config['global_batch_size'], config['batch_size'],
                                                         config['gpus'])}
    capacity = config['gpu_memory_gb'] * GIB
    configured = Setup(config['gpus'], config['batch_size'], config['grad_accum'], config['activation_checkpointing'])
    results = {configured: simulate(args, config, configured, loss_fn, make_batch)}
    if not _fits(results[configured].peak, capacity):
        for setup in _alternatives(configured, results[configured].peak, capacity):
            results[setup] = simulate(args, config, setup, loss_fn, make_batch)
    no_ac = replace(configured, activation_checkpointing=False)
    if configured.activation_checkpointing and _fits(results[configured].peak, capacity):
        results[no_ac] = simulate(args, config, no_ac, loss_fn, make_batch)  # would it fit without the recompute?
    print(_table({s: m.peak for s, m in results.items()}, capacity))
    if config['compile']:
        print("compile=True: measured without it (Dynamo does not trace under the dry run's dispatch modes); "
              "compiled blocks keep a different set of tensors for backward")
    return config, configured, results


def _fits_without_checkpointing(config, setup, results):
    no_ac = replace(setup, activation_checkpointing=False)
    return no_ac != setup and no_ac in results and _fits(results[no_ac].peak, config['gpu_memory_gb'] * GIB)


def _fits(peak, capacity):
    # 'Peak': where not every row is held at once (GRPO: the KV cache while generating, activations while updating)
    return peak.get('Peak', peak['Total']) <= HEADROOM * capacity


def _alternatives(setup, peak, capacity):
    """Settings to try when `setup` does not fit, each changing one thing, chosen by how its memory
    scales: activations with the micro-batch, the sharded state (fp32 weights, gradients, AdamW's two
    moments) with 1 / GPUs. The sequences per step stay the same where the numbers divide."""
    tries = []
    if not setup.activation_checkpointing:
        tries.append(replace(setup, activation_checkpointing=True))
    activations = sum(peak.get(k, 0) for k in KINDS['activations'])
    per_rank = setup.batch_size * setup.grad_accum
    for b in range(setup.batch_size - 1, 0, -1):
        if per_rank % b == 0 and (peak['Total'] - activations * (1 - b / setup.batch_size) <= HEADROOM * capacity
                                  or b == 1):
            tries.append(replace(setup, batch_size=b, grad_accum=per_rank // b))
            break
    sharded = sum(peak.get(k, 0) for k in ['Sharded Param', 'Sharded Grad', 'OptState'])
    rest = peak['Total'] - sharded
    if rest < HEADROOM * capacity:  # else no number of GPUs is enough on its own
        gpus = setup.gpus * 2
        while sharded * setup.gpus / gpus + rest > HEADROOM * capacity:
            gpus *= 2
        micro_batches = setup.grad_accum * setup.gpus  # per step, over all GPUs
        accum = micro_batches // gpus if micro_batches % gpus == 0 else setup.grad_accum
        tries.append(replace(setup, gpus=gpus, grad_accum=accum))
    return tries


def _describe(setup):
    ac = 'AC on' if setup.activation_checkpointing else 'AC off'
    return f"{_gpus(setup.gpus)}, {setup.batch_size} x {setup.grad_accum} accum, {ac}"


def _gpus(n):
    return f"{n} GPU{'s' if n > 1 else ''}"


def _table(peaks, capacity, kinds=KINDS, describe=_describe, totals=(('**total**', 'Total'),)):
    """Markdown: one column per setup (the configured one first), one row per kind of memory.
    peaks: {setup: {kind: bytes, 'Total': bytes}}; kinds: {row label: the kinds it sums}; totals: (label, key)
    of the rows after them."""
    setups = list(peaks)
    head = ['per GPU, at the peak'] + [('as configured: ' if i == 0 else 'try: ') + describe(s)
                                        for i, s in enumerate(setups)]
    rows = [head, ['---'] + ['---:'] * len(setups)]
    for label, grouped in kinds.items():
        rows.append([label] + [_size(sum(peaks[s].get(k, 0) for k in grouped)) for s in setups])
    for label, key in totals:
        rows.append([label] + [f"**{_size(peaks[s][key])}**" for s in setups])
    rows.append([f"fits {capacity / GIB:g} GiB (with {1 - HEADROOM:.0%} headroom)?"] +
                ['yes' if _fits(peaks[s], capacity) else '**no**' for s in setups])
    lines = ['| ' + ' | '.join(r) + ' |' for r in rows]
    fits = _fits(peaks[setups[0]], capacity)
    verdict = 'fits' if fits else 'does NOT fit'
    fixes = [describe(s) for s in setups[1:] if _fits(peaks[s], capacity)]
    if fits and fixes:
        verdict += f"; it also fits with: {' | '.join(fixes)}"
    elif not fits:
        verdict += f"; it would fit with: {' | '.join(fixes)}" if fixes else '; none of the tried settings fits either'
    return f"dry run: the configured run {verdict}\n\n" + '\n'.join(lines) + '\n'


def _number(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _took(hours):
    return f"{_number(hours)} hours" if hours < 48 else f"{_number(hours / 24)} days"


def _size(n):
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.2f} MiB"


def _arithmetic(args, config, setup, max_steps, plan):
    """Tokens, FLOPs and time per step and for the whole run, at the assumed MFU."""
    peak_flops = datasheet_peak(config['gpu'])
    block = config['block_size']
    sequences = setup.batch_size * setup.grad_accum * setup.gpus
    tokens = sequences * block
    per_token = flops_per_token(args, block)
    seconds = _step_seconds(args, config, setup)
    lines = [
        f"tokens/step: {setup.batch_size} x {setup.grad_accum} accum x {_gpus(setup.gpus)} = {sequences:,} sequences "
        f"x {block:,} = {tokens:,}",
        f"FLOPs/token: {per_token:.4g} = {flops_per_token(args, 0):.4g} for the weights (6 per matmul weight) + "
        f"{per_token - flops_per_token(args, 0):.4g} for attention over {block:,} tokens (trainer.flops_per_token)",
        f"time/step: {tokens:,} x {per_token:.4g} FLOPs / ({setup.gpus} x {peak_flops / 1e12:.0f} TFLOP/s "
        f"({config['gpu']} bf16 datasheet peak) x MFU {config['mfu']:.0%}) = {seconds:.3g} s"]
    if max_steps:
        hours = max_steps * seconds / 3600
        lines.append(f"whole run: {max_steps:,} steps = {max_steps * tokens:.4g} tokens: {_took(hours)} on "
                     f"{_gpus(setup.gpus)} = {_number(hours * setup.gpus)} GPU-hours")
    (n_model, model_bytes), (n_optim, optim_bytes) = plan['model'], plan['optim']
    lines.append(f"checkpoint (DCP, all ranks together): model {n_model} tensors, {_size(model_bytes)} + optimizer "
                 f"{n_optim} tensors, {_size(optim_bytes)} per save; final.pt {_size(model_bytes)}")
    return '\n'.join(lines)


def _step_seconds(args, config, setup):
    """An optimizer step's training FLOPs over the GPUs' datasheet peak at the assumed MFU."""
    tokens = setup.batch_size * setup.grad_accum * setup.gpus * config['block_size']
    return tokens * flops_per_token(args, config['block_size']) / (
        setup.gpus * datasheet_peak(config['gpu']) * config['mfu'])


def recompute_flops_per_token(args, seq_len):
    """The FLOPs per token activation checkpointing adds: every block's forward once more, i.e. a third
    of the blocks' training FLOPs (2 of 6 per weight, 4 of the attention's 12); the head is not recomputed."""
    head = 6 * args.vocab_size * args.dim
    return (flops_per_token(args, seq_len) - head) / 3


def _without_checkpointing(args, config, setup, max_steps):
    """What turning activation checkpointing off saves, at the hardware FLOP/s the configured run has."""
    block = config['block_size']
    useful, extra = flops_per_token(args, block), recompute_flops_per_token(args, block)
    with_ac = _step_seconds(args, config, setup)
    without = with_ac * useful / (useful + extra)
    line = (f"without activation checkpointing it fits too: no block's forward is recomputed ({extra:.4g} of "
            f"{useful + extra:.4g} FLOPs per token), so at the same hardware FLOP/s time/step {with_ac:.3g} -> "
            f"{without:.3g} s (MFU {config['mfu']:.0%} -> {config['mfu'] * (useful + extra) / useful:.0%})")
    if max_steps:
        hours = [max_steps * s * setup.gpus / 3600 for s in (with_ac, without)]
        line += (f"; whole run {_number(hours[0])} -> {_number(hours[1])} GPU-hours: set "
                 f"activation_checkpointing=False")
    return line


# ----------------------------------------------------------------------------- DPO

def preference_pairs(batch_size, block_size, vocab_size):
    """A DPO micro-batch as dataloader.PairLoader makes it: batch_size chosen, then batch_size rejected
    conversations, each block_size long (the worst case), their targets [2 x batch_size, block_size],
    and the pairs' numbers."""
    x, y = random_tokens(2 * batch_size, block_size, vocab_size)
    return x, y, torch.arange(batch_size)


def dpo_loss_against_zeros(beta, loss_type):
    """dpo.dpo_loss with a reference log-prob of 0 for every pair: the values change no memory."""
    def loss_fn(model, batch):
        return dpo.dpo_loss(model, batch, torch.zeros(len(batch[2]), 2), beta, loss_type)
    return loss_fn


def dpo_steps(config):
    """dpo.py's optimizer steps for the whole run: PairLoader's groups of batch_size pairs of the training
    pairs (dataset_pairs less heldout_pairs), one per rank per micro-batch; 0 when dataset_pairs is not given."""
    if not config['dataset_pairs']:
        return 0
    gpus, batch_size = config['gpus'], config['batch_size']
    accum = (grad_accum_for(config['global_batch_size'], batch_size, gpus, 'pairs')
             if config['global_batch_size'] else config['grad_accum'])
    groups = math.ceil(max(config['dataset_pairs'] - config['heldout_pairs'], 0) / batch_size)
    return math.ceil(config['epochs'] * (groups // gpus) / accum)


def dpo_dry_run(args, config):
    """dry_run for dpo.py: the policy as sft.py's, each micro-batch holding batch_size pairs (twice as many
    conversations); the reference costs no memory, and its one pass over the dataset is added to the time."""
    t0 = time.time()
    loss_fn = dpo_loss_against_zeros(config['beta'], config['loss_type'])
    config, configured, results = _simulate_setups(args, config, loss_fn, preference_pairs)
    steps = dpo_steps(config)
    conversations = replace(configured, batch_size=2 * configured.batch_size)  # what the FLOPs count
    print(f"(a micro-batch of {_plural(configured.batch_size, 'pair')} is {conversations.batch_size} conversations)")
    print(_arithmetic(args, config, conversations, steps, results[configured].plan))
    print(_dpo_reference(args, config, conversations, steps))
    if _fits_without_checkpointing(config, configured, results):
        print(_without_checkpointing(args, config, conversations, steps))
    print(f"(dry run: {len(results)} simulation(s) on this CPU in {time.time() - t0:.0f}s; nothing read or written)")


def _dpo_reference(args, config, setup, steps):
    """What the reference model costs: no memory while training, and one forward pass over every pair."""
    line = ("reference model: no memory while training (dpo.py scores every pair with the starting model once, "
            "before the first step, and keeps those log-probs: 8 bytes per pair, out_dir/reference_logps.pt)")
    pairs, block, gpus = config['dataset_pairs'], config['block_size'], setup.gpus
    if not pairs:
        return line + "; for the time of that pass, give the dataset's size: --dataset_pairs=N"
    forward = flops_per_token(args, block) / 3  # 2 of the 6 FLOPs per weight, 4 of the attention's 12
    seconds = 2 * pairs * block * forward / (gpus * datasheet_peak(config['gpu']) * config['mfu'])
    hours = (steps * _step_seconds(args, config, setup) + seconds) / 3600
    return (f"{line}; that pass: {pairs:,} pairs x 2 x {block:,} tokens x {forward:.4g} FLOPs (a forward) = "
            f"{_number(seconds / 60)} min on {_gpus(gpus)}\n"
            f"whole run with it: {_took(hours)} on {_gpus(gpus)} = {_number(hours * gpus)} GPU-hours")


def _plural(n, noun):
    return f"{n:,} {noun}{'s' if n != 1 else ''}"


# ----------------------------------------------------------------------------- GRPO

@dataclass(frozen=True)
class RLSetup:
    """What decides a GRPO rank's memory: the GPUs, the update's micro-batch budget (micro_batch_tokens),
    activation checkpointing, and the completions the rank generates at once (its KV cache)."""
    gpus: int
    micro_batch_tokens: int
    activation_checkpointing: bool
    rollout_rows: int


# the table's rows for GRPO: the update's, as the tracker counts them, then what a GRPO rank holds besides
RL_KINDS = {**KINDS, 'reference, sharded (frozen)': ['Reference'], 'rollout copy, unsharded (bf16)': ['Rollout copy'],
            'KV cache of the rollout batch (bf16)': ['KV cache']}
# what a rank holds while it generates: no gradient, activation or gathered block; the KV cache is freed
# before the update
GENERATING = ('Sharded Param', 'OptState', 'Reference', 'Rollout copy', 'KV cache')
RL_TOTALS = (('**total**, every row at once', 'Total'),
             ('**while generating** (no gradients, activations)', 'Generating'),
             ('**while updating** (no KV cache)', 'Updating'))
# every kind a GRPO rank holds (the totals aside)
RL_KINDS_HELD = [k for kinds in RL_KINDS.values() for k in kinds]
# what more GPUs divide: the shards, and each rank's rollout rows
SHARDED = ('Sharded Param', 'Sharded Grad', 'OptState', 'Reference', 'KV cache')


def datasheet_bandwidth(gpu):
    return next(bandwidth for part, bandwidth in GPU_BANDWIDTH.items() if part in gpu)


def completions_per_rank(config, gpus):
    """The completions a rank generates in a step: its prompts_per_step / gpus prompts, group_size each."""
    return config['prompts_per_step'] // gpus * config['group_size']


def rollout_rows(config, gpus):
    """The completions a rank generates at once (the rows of its KV cache): grpo.py's rollout_rows,
    or all of its completions when they are fewer."""
    return min(config['rollout_rows'], completions_per_rank(config, gpus))


def fullest_micro_batch(micro_batch_tokens, block_size):
    """[rows, length] of the fullest micro-batch grpo.micro_batches packs: rows x length up to micro_batch_tokens
    padded tokens, the rows as long as that allows (at most block_size - 1: x drops the last token); one row
    of block_size - 1 when that alone exceeds micro_batch_tokens (a micro-batch of its own)."""
    longest = block_size - 1
    if micro_batch_tokens <= longest:
        return 1, longest
    rows = -(-micro_batch_tokens // longest)
    return rows, micro_batch_tokens // rows


def rollout_batch(rows, length, vocab_size):
    """A GRPO micro-batch as grpo.with_logprobs hands it to grpo.grpo_loss: x and y [rows, length], the
    advantages [rows], and the log-probs under pi_old and pi_ref [rows, length]."""
    x, y = random_tokens(rows, length, vocab_size)
    return x, y, torch.randn(rows), torch.randn(rows, length), torch.randn(rows, length)


def n_params(args):
    with torch.device('meta'):
        return Transformer(args).num_params()


def kv_cache_bytes(args, rows, block_size):
    """The bf16 KV cache of `rows` completions of at most block_size tokens (prompt + response), as model.KVCache
    allocates it: block_size slots per layer and row, or the rolling window's, if fewer."""
    return KVCache(args, rows, 'meta', torch.bfloat16, max_tokens=block_size).nbytes()


def grpo_memory(args, config, setup, measured):
    """{kind: bytes} of a GRPO rank: the update as simulated (measured: simulate's Measurement, with the
    reference's shards), the rollout copy, and the KV cache of setup.rollout_rows completions; with the
    totals (with_phases)."""
    held = {k: n for k, n in measured.peak.items() if k != 'Total'}
    held.update({'Reference': measured.reference, 'Rollout copy': 2 * n_params(args),
                 'KV cache': kv_cache_bytes(args, setup.rollout_rows, config['block_size'])})
    return with_phases(held)


def with_phases(held):
    """{kind: bytes} -> the same with 'Total' (every kind at once), 'Generating', 'Updating' (what the two
    phases of a step hold) and 'Peak', the larger of the two: what the GPU must hold."""
    total, generating = sum(held.values()), sum(held.get(k, 0) for k in GENERATING)
    updating = total - held['KV cache']
    return {**held, 'Total': total, 'Generating': generating, 'Updating': updating, 'Peak': max(generating, updating)}


def grpo_dry_run(args, config):
    """dry_run for grpo.py: the table (each rank's update simulated with the fullest micro-batch
    micro_batch_tokens allows, plus the reference, the rollout copy and the KV cache), the settings that would
    fit when it does not, and the time of a step: rollouts from decode arithmetic, then the training FLOPs."""
    t0 = time.time()
    check_dry_run_settings(config)
    gpus = config['gpus']
    if config['prompts_per_step'] % (config['mini_batches'] * gpus):
        raise UsageError(f"prompts_per_step={config['prompts_per_step']} must be a multiple of mini_batches x gpus "
                         f"= {config['mini_batches']} x {gpus}")
    capacity = config['gpu_memory_gb'] * GIB
    loss_fn = partial(grpo.grpo_loss, clip_eps=config['clip_eps'], kl_coef=config['kl_coef'])
    simulations = {}

    def memory(setup):
        key = (setup.gpus, setup.micro_batch_tokens, setup.activation_checkpointing)
        if key not in simulations:  # the rollout rows change no simulated tensor
            rows, length = fullest_micro_batch(setup.micro_batch_tokens, config['block_size'])
            update = Setup(setup.gpus, rows, 2, setup.activation_checkpointing)
            simulations[key] = simulate(args, {**config, 'block_size': length}, update, loss_fn, rollout_batch,
                                        reference=config['kl_coef'] > 0)
        return grpo_memory(args, config, setup, simulations[key])

    configured = RLSetup(gpus, config['micro_batch_tokens'], config['activation_checkpointing'],
                         rollout_rows(config, gpus))
    peaks = {configured: memory(configured)}
    if not _fits(peaks[configured], capacity):
        for setup in _rl_alternatives(configured, peaks[configured], capacity, config):
            peaks[setup] = memory(setup)
    print(_table(peaks, capacity, RL_KINDS, _describe_rl, RL_TOTALS))
    rows, length = fullest_micro_batch(configured.micro_batch_tokens, config['block_size'])
    print(f"(the update simulated with the fullest micro-batch micro_batch_tokens={configured.micro_batch_tokens:,} "
          f"packs, {rows} x {length:,} tokens; the verdict is on the larger of the two peaks)")
    if config['compile']:
        print("compile=True: measured without it (Dynamo does not trace under the dry run's dispatch modes)")
    print(_grpo_arithmetic(args, config, configured))
    print(f"(dry run: {len(simulations)} simulation(s) on this CPU in {time.time() - t0:.0f}s; nothing read or "
          f"written)")


def _rl_alternatives(setup, peak, capacity, config):
    """Settings to try when a GRPO rank does not fit, each changing one thing, estimated from how its memory
    scales: activation checkpointing on; a smaller update micro-batch (activations and temporaries shrink with
    its tokens); more GPUs (the shards and each rank's rollout rows shrink with 1 / GPUs, as long as
    prompts_per_step divides); rollouts generated a few whole groups at a time (the KV cache shrinks with the rows)."""
    room, block = HEADROOM * capacity, config['block_size']
    fits = lambda scale, kinds: with_phases({k: n * (scale if k in kinds else 1) for k, n in peak.items()
                                             if k in RL_KINDS_HELD})['Peak'] <= room
    tries = []
    if not setup.activation_checkpointing:
        tries.append(replace(setup, activation_checkpointing=True))
    tokens = lambda budget: math.prod(fullest_micro_batch(budget, block))
    budget = setup.micro_batch_tokens
    while budget >= block:  # more than one row: a smaller budget packs fewer tokens
        budget //= 2
        if fits(tokens(budget) / tokens(setup.micro_batch_tokens), KINDS['activations'] + KINDS['temporaries']):
            break
    if budget != setup.micro_batch_tokens:
        tries.append(replace(setup, micro_batch_tokens=budget))
    gpus = setup.gpus * 2
    while config['prompts_per_step'] % (config['mini_batches'] * gpus) == 0:
        if fits(setup.gpus / gpus, SHARDED):
            tries.append(RLSetup(gpus, setup.micro_batch_tokens, setup.activation_checkpointing,
                                 rollout_rows(config, gpus)))
            break
        gpus *= 2
    per_row, group = peak['KV cache'] / setup.rollout_rows, config['group_size']
    rows = int((room - peak['Generating'] + peak['KV cache']) // per_row)
    rows = rows // group * group if rows >= group else rows
    if peak['Updating'] <= room and 1 <= rows < setup.rollout_rows:
        tries.append(replace(setup, rollout_rows=rows))
    return tries


def _describe_rl(setup):
    ac = 'AC on' if setup.activation_checkpointing else 'AC off'
    return (f"{_gpus(setup.gpus)}, micro-batches of {setup.micro_batch_tokens:,} tokens, {ac}, "
            f"{_plural(setup.rollout_rows, 'completion')} generated at once")


def weights_bytes(args):
    """bf16 bytes of the matmul weights: what a decode step reads (6 training FLOPs per weight)."""
    return 2 * flops_per_token(args, 0) // 6


def decode_seconds(args, rows, prompt_tokens, new_tokens, bandwidth, flops_per_s):
    """The time to generate new_tokens tokens for `rows` completions whose prompts are prompt_tokens long: a
    decode step per token, each as long as the slower of reading (the bf16 matmul weights once, and every
    row's filled KV-cache slots, bandwidth bytes/s) and computing (a forward's FLOPs for each row, flops_per_s)."""
    cache = KVCache(args, 1, 'meta', torch.bfloat16, max_tokens=prompt_tokens + new_tokens)
    weights, per_slot = weights_bytes(args), cache.nbytes() / cache.capacity
    seconds = 0.0
    for t in range(1, new_tokens + 1):
        filled = min(prompt_tokens + t, cache.capacity)  # the rolling buffer stops growing at its capacity
        read = weights + rows * filled * per_slot
        seconds += max(read / bandwidth, rows * flops_per_token(args, filled) / 3 / flops_per_s)
    return seconds


def _grpo_arithmetic(args, config, setup):
    """A step's time on each rank (the ranks work in parallel): its rollouts, the log-prob passes, the update."""
    gpu, mfu, block, new = config['gpu'], config['mfu'], config['block_size'], config['max_new_tokens']
    flops_per_s, bandwidth = datasheet_peak(gpu) * mfu, datasheet_bandwidth(gpu)
    prompts, prompt = config['prompts_per_step'] // setup.gpus, block - new
    rows, length = completions_per_rank(config, setup.gpus), block - 1
    chunks = -(-rows // setup.rollout_rows)  # generate() calls, each setup.rollout_rows rows at most
    decode = chunks * decode_seconds(args, setup.rollout_rows, prompt, new, bandwidth, flops_per_s)
    prefill = prompts * prompt * flops_per_token(args, prompt) / 3 / flops_per_s  # each distinct prompt once
    tokens = rows * length
    passes = 2 if config['kl_coef'] else 1  # pi_old, and pi_ref when there is a KL term
    logprobs = passes * tokens * flops_per_token(args, length) / 3 / flops_per_s
    update = config['ppo_epochs'] * tokens * flops_per_token(args, length) / flops_per_s
    step = decode + prefill + logprobs + update
    kv = kv_cache_bytes(args, setup.rollout_rows, block)
    hours = config['max_steps'] * step / 3600
    return '\n'.join([
        f"rollouts per GPU: {prompts} prompts x {config['group_size']} = {rows} completions of a prompt of up to "
        f"{prompt:,} tokens + {new:,} new ones (every completion assumed to run to max_new_tokens: the worst case)",
        f"  decode: {_plural(chunks, 'call')} of {setup.rollout_rows} rows x {new:,} steps, each reading the bf16 "
        f"weights ({_size(weights_bytes(args))}) and the filled KV cache (up to {_size(kv)}) at "
        f"{bandwidth / 1e12:.3g} TB/s ({gpu} HBM datasheet), or computing {setup.rollout_rows} tokens at MFU "
        f"{mfu:.0%} where that is slower: {_number(decode)} s",
        f"  prefill: {prompts} prompts x {prompt:,} tokens at MFU {mfu:.0%}: {_number(prefill)} s",
        f"log-probs: {passes} forward pass(es) (pi_old{', pi_ref' if passes == 2 else ''}) over {rows} x {length:,} "
        f"tokens: {_number(logprobs)} s",
        f"update: {config['ppo_epochs']} epoch(s) x {tokens:,} tokens x {flops_per_token(args, length):.4g} FLOPs "
        f"(trainer.flops_per_token) at MFU {mfu:.0%} of {datasheet_peak(gpu) / 1e12:.0f} TFLOP/s: {_number(update)} s",
        f"time/step: {_number(step)} s, {decode / step:.0%} of it decoding; whole run: {config['max_steps']:,} steps: "
        f"{_took(hours)} on {_gpus(setup.gpus)} = {_number(hours * setup.gpus)} GPU-hours "
        f"(not counted: the weight sync to the rollout copy, the rewards)"])


# ----------------------------------------------------------------------------- the command

def stage_settings(argv):
    """`STAGE.py [config/file.py] [--key=value ...]` -> (the stage's name, its settings as the real
    run would have them, plus the dry run's own). ConfigError on an unknown stage or setting."""
    stage = argv[0].removesuffix('.py') if argv else ''
    if stage not in STAGES:
        raise ConfigError(f"usage: python dryrun.py {{{','.join(s + '.py' for s in STAGES)}}} [config/file.py] "
                          f"[--key=value ...] (got {' '.join(argv[:1]) or 'nothing'})")
    module = importlib.import_module(stage)  # its settings; importing a stage runs nothing
    config = {**{k: getattr(module, k) for k in module.config_keys}, **{k: globals()[k] for k in config_keys}}
    apply_overrides(config, list(config), argv[1:])
    return stage, config


def sft_steps(config):
    """sft.py's optimizer steps for the whole run, as its ChatLoader and max_steps count them, with
    every conversation as long as block_size (the most memory and time a step can take)."""
    gpus = config['gpus']
    accum = (grad_accum_for(config['global_batch_size'], config['batch_size'], gpus, 'conversations')
             if config['global_batch_size'] else config['grad_accum'])
    return math.ceil(config['epochs'] * (config['dataset_conversations'] // (config['batch_size'] * gpus)) / accum)


def main(argv):
    try:
        stage, config = stage_settings(argv)
        if stage == 'pretrain':
            dry_run(preset_args(config['preset'], config['model_overrides']), config, config['max_steps'])
        elif stage == 'sft':
            dry_run(preset_args(config['shape'], {}), config, sft_steps(config))
        elif stage == 'dpo':
            dpo_dry_run(preset_args(config['shape'], {}), config)
        else:
            grpo_dry_run(preset_args(config['shape'], {}), config)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main(sys.argv[1:])
