"""
The dry run: a training stage's own code path on this CPU, simulated over N GPUs: does it fit in
memory, and what will the run cost? Put it in front of the training command:

    python dryrun.py pretrain.py config/moxin7b_phase1.py --gpus=64
    python dryrun.py sft.py config/sft_tulu3.py --gpus=8 --dataset_conversations=939343
    python dryrun.py pretrain.py config/moxin7b_phase1.py --gpus=16 --gpu_memory_gb=40 --gpu=A100 --mfu=0.35

Its own settings are below (gpus, gpu_memory_gb, gpu, mfu, and for sft the shape and the dataset's
size); every other --key=value, and the config file, set the stage's settings as they would for the
real run. It reads no data or weights and writes nothing.

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
"""
import importlib
import math
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from configurator import ConfigError, apply_overrides
from trainer import (GPU_PEAK_FLOPS, UsageError, build_model, build_optimizer, datasheet_peak, flops_per_token,
                     fsdp_precision, grad_accum_for, lm_loss, preset_args, train_step)

# ----------------------------------------------------------------------------- the dry run's own settings
gpus = 8                       # GPUs to simulate
gpu_memory_gb = 80.0           # memory per GPU, GiB
gpu = 'H100'                   # whose datasheet bf16 peak (trainer.GPU_PEAK_FLOPS) the time is computed for
mfu = 0.4                      # the model FLOPs utilisation assumed for time and GPU-hours
shape = 'moxin-7b'             # sft: init_from's shape (a model.PRESETS name), since no weights are read
dataset_conversations = 0      # sft: the dataset's conversations, for the whole run's time (0: per step only)
config_keys = ['gpus', 'gpu_memory_gb', 'gpu', 'mfu', 'shape', 'dataset_conversations']
STAGES = ('pretrain', 'sft')   # the stages it can simulate: the ones whose batches are token blocks

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


def simulate(args, config, setup, loss_fn=lm_loss, make_batch=random_tokens):
    """Two training steps of rank 0 of setup.gpus, on fake tensors. -> Measurement."""
    # imported here: it imports torch._inductor, seconds that no training run should wait for
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    # the device is the CPU (a CPU build cannot run autograd on fake CUDA tensors); precision is CUDA's
    device = torch.device('cpu')
    with fake_ranks(setup.gpus) as fsdp:
        model = build_model(args, device, config['seed'], None, False, setup.activation_checkpointing, fsdp)
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
        return Measurement(_snapshot(tracker, 'peak'), at_update, checkpoint_plan(model, optimizer))


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
    if dist.is_initialized():
        raise UsageError("dryrun.py: run it as one plain process (python, not torchrun); it simulates the GPUs itself")
    gpus, gpu, mfu = config['gpus'], config['gpu'], config['mfu']
    if not (isinstance(gpus, int) and gpus >= 1):
        raise UsageError(f"gpus={gpus!r}: the number of GPUs to simulate, an integer >= 1")
    if datasheet_peak(gpu) is None:
        raise UsageError(f"gpu={gpu!r}: no datasheet peak for it (known: {', '.join(GPU_PEAK_FLOPS)})")
    if not 0 < mfu <= 1:
        raise UsageError(f"mfu={mfu!r}: the fraction of the GPU's peak FLOP/s the run achieves, in (0, 1]")
    if config.get('global_batch_size'):  # the recipe's global batch on the simulated GPUs, as a real run derives it
        config = {**config, 'grad_accum': grad_accum_for(config['global_batch_size'], config['batch_size'], gpus)}
    capacity = config['gpu_memory_gb'] * GIB
    configured = Setup(gpus, config['batch_size'], config['grad_accum'], config['activation_checkpointing'])
    results = {configured: simulate(args, config, configured, loss_fn, make_batch)}
    if not _fits(results[configured].peak, capacity):
        for setup in _alternatives(configured, results[configured].peak, capacity):
            results[setup] = simulate(args, config, setup, loss_fn, make_batch)
    no_ac = replace(configured, activation_checkpointing=False)
    if configured.activation_checkpointing and _fits(results[configured].peak, capacity):
        results[no_ac] = simulate(args, config, no_ac, loss_fn, make_batch)  # would it fit without the recompute?
    print(_table(results, capacity))
    if config['compile']:
        print("compile=True: measured without it (Dynamo does not trace under the dry run's dispatch modes); "
              "compiled blocks keep a different set of tensors for backward")
    print(_arithmetic(args, config, configured, max_steps, results[configured].plan))
    if no_ac in results and _fits(results[no_ac].peak, capacity):
        print(_without_checkpointing(args, config, configured, max_steps))
    print(f"(dry run: {len(results)} simulation(s) on this CPU in {time.time() - t0:.0f}s; nothing read or written)")


def _fits(peak, capacity):
    return peak['Total'] <= HEADROOM * capacity


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


def _table(results, capacity):
    """Markdown: one column per setup (the configured one first), one row per kind of memory."""
    setups = list(results)
    head = ['per GPU, at the peak'] + [('as configured: ' if i == 0 else 'try: ') + _describe(s)
                                        for i, s in enumerate(setups)]
    rows = [head, ['---'] + ['---:'] * len(setups)]
    for label, kinds in KINDS.items():
        rows.append([label] + [_size(sum(results[s].peak.get(k, 0) for k in kinds)) for s in setups])
    rows.append(['**total**'] + [f"**{_size(results[s].peak['Total'])}**" for s in setups])
    rows.append([f"fits {capacity / GIB:g} GiB (with {1 - HEADROOM:.0%} headroom)?"] +
                ['yes' if _fits(results[s].peak, capacity) else '**no**' for s in setups])
    lines = ['| ' + ' | '.join(r) + ' |' for r in rows]
    fits = _fits(results[setups[0]].peak, capacity)
    verdict = 'fits' if fits else 'does NOT fit'
    fixes = [_describe(s) for s in setups[1:] if _fits(results[s].peak, capacity)]
    if fits and fixes:
        verdict += f"; it also fits with: {' | '.join(fixes)}"
    elif not fits:
        verdict += f"; it would fit with: {' | '.join(fixes)}" if fixes else '; none of the tried settings fits either'
    return f"dry run: the configured run {verdict}\n\n" + '\n'.join(lines) + '\n'


def _number(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _size(n):
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.2f} MiB"


def _arithmetic(args, config, setup, max_steps, plan):
    """Tokens, FLOPs and time per step and for the whole run, at the assumed MFU."""
    peak_flops = datasheet_peak(config['gpu'])
    block = config['block_size']
    sequences = setup.batch_size * setup.grad_accum * setup.gpus
    tokens = sequences * block
    per_token = flops_per_token(args, block)
    seconds = tokens * per_token / (setup.gpus * peak_flops * config['mfu'])
    lines = [
        f"tokens/step: {setup.batch_size} x {setup.grad_accum} accum x {_gpus(setup.gpus)} = {sequences:,} sequences "
        f"x {block:,} = {tokens:,}",
        f"FLOPs/token: {per_token:.4g} = {flops_per_token(args, 0):.4g} for the weights (6 per matmul weight) + "
        f"{per_token - flops_per_token(args, 0):.4g} for attention over {block:,} tokens (trainer.flops_per_token)",
        f"time/step: {tokens:,} x {per_token:.4g} FLOPs / ({setup.gpus} x {peak_flops / 1e12:.0f} TFLOP/s "
        f"({config['gpu']} bf16 datasheet peak) x MFU {config['mfu']:.0%}) = {seconds:.3g} s"]
    if max_steps:
        hours = max_steps * seconds / 3600
        took = f"{_number(hours)} hours" if hours < 48 else f"{_number(hours / 24)} days"
        lines.append(f"whole run: {max_steps:,} steps = {max_steps * tokens:.4g} tokens: {took} on {_gpus(setup.gpus)} "
                     f"= {_number(hours * setup.gpus)} GPU-hours")
    (n_model, model_bytes), (n_optim, optim_bytes) = plan['model'], plan['optim']
    lines.append(f"checkpoint (DCP, all ranks together): model {n_model} tensors, {_size(model_bytes)} + optimizer "
                 f"{n_optim} tensors, {_size(optim_bytes)} per save; final.pt {_size(model_bytes)}")
    return '\n'.join(lines)


def recompute_flops_per_token(args, seq_len):
    """The FLOPs per token activation checkpointing adds: every block's forward once more, i.e. a third
    of the blocks' training FLOPs (2 of 6 per weight, 4 of the attention's 12); the head is not recomputed."""
    head = 6 * args.vocab_size * args.dim
    return (flops_per_token(args, seq_len) - head) / 3


def _without_checkpointing(args, config, setup, max_steps):
    """What turning activation checkpointing off saves, at the hardware FLOP/s the configured run has."""
    block = config['block_size']
    useful, extra = flops_per_token(args, block), recompute_flops_per_token(args, block)
    tokens = setup.batch_size * setup.grad_accum * setup.gpus * block
    with_ac = tokens * useful / (setup.gpus * datasheet_peak(config['gpu']) * config['mfu'])
    without = with_ac * useful / (useful + extra)
    line = (f"without activation checkpointing it fits too: no block's forward is recomputed ({extra:.4g} of "
            f"{useful + extra:.4g} FLOPs per token), so at the same hardware FLOP/s time/step {with_ac:.3g} -> "
            f"{without:.3g} s (MFU {config['mfu']:.0%} -> {config['mfu'] * (useful + extra) / useful:.0%})")
    if max_steps:
        hours = [max_steps * s * setup.gpus / 3600 for s in (with_ac, without)]
        line += (f"; whole run {_number(hours[0])} -> {_number(hours[1])} GPU-hours: set "
                 f"activation_checkpointing=False")
    return line


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
        else:
            dry_run(preset_args(config['shape'], {}), config, sft_steps(config))
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main(sys.argv[1:])
