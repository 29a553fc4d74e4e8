"""
Pre-train a Moxin-style transformer on token shards (from `python data.py`).

    python pretrain.py                                   # the demo: a small model, 2 CPU cores, minutes
    python pretrain.py config/demo.py --max_steps=100    # a config file, then --key=value overrides
    torchrun --nproc_per_node=8 pretrain.py config/moxin7b_phase1.py    # one node, FSDP2

The same code runs both: under torchrun every block is sharded with FSDP2
(`fully_shard`, then the root), so each rank holds 1/world_size of the weights,
gradients and optimizer state; as a plain process it is ordinary single-device training.

What ends up in out_dir:
    checkpoints/step_NNNNNNNN/   resumable state (torch.distributed.checkpoint: each rank
                                 writes its own shard); meta.json is written last, so a
                                 directory without it is an interrupted save and is ignored
    log.jsonl                    one JSON record per log interval and per evaluation
    final.pt                     the trained weights in one file (model.save_checkpoint), read
                                 by sample.py, eval.py and sft.py; hf/ too with export_hf=True

Run it again with the same out_dir and it resumes from the newest complete checkpoint.
sft.py imports the machinery below (setup_distributed .. save_final, launch, train_loop) instead
of copying it: the two scripts differ only in their data and learning-rate schedule.
"""
import glob
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data import PackedLoader, Tokenizer
from model import ModelArgs, ModelLoadError, Transformer, load_model, model_args, save_checkpoint
from model import export_hf as write_hf_dir  # `export_hf` is also the name of a setting below

# ----------------------------------------------------------------------------- defaults (= config/demo.py)
# data and model
data_dir = 'data/pydoc'       # token shards written by `python data.py` (its default out_dir)
preset = 'demo'               # model.PRESETS name, used when starting from scratch
model_overrides = {}          # ModelArgs fields to change in the preset, e.g. {'n_layers': 2}
init_from = ''                # '' = random init; or a .pt checkpoint / HF model dir to continue from
# batch: one optimizer step sees batch_size * grad_accum * world_size sequences of block_size tokens
block_size = 256
batch_size = 8                # sequences per micro-batch per rank
grad_accum = 1                # micro-batches per optimizer step
# optimizer and schedule
lr = 2e-3                     # peak learning rate
min_lr_ratio = 0.1            # cosine ends at min_lr_ratio * lr
warmup_steps = 20
max_steps = 200
weight_decay = 0.1            # matrices only
betas = (0.9, 0.95)
eps = 1e-8
grad_clip = 1.0
seed = 1337
# speed / memory
compile = False               # torch.compile each block
activation_checkpointing = False  # recompute each block's activations in backward
# output
out_dir = 'out'
resume = 'auto'               # 'auto' = newest complete checkpoint in out_dir, if any; or a checkpoint dir
ckpt_interval = 100           # steps between resumable checkpoints
keep_last = 2                 # resumable checkpoints kept on disk
log_interval = 10
eval_interval = 50            # steps between validation losses (0 = only at the end)
eval_batches = 4              # micro-batches per validation loss
export_hf = False             # also write {out_dir}/hf, an HF MistralForCausalLM directory
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None), list, tuple, dict))]


# DCP warns on every single-process save/load that no process group exists; that is intended here
warnings.filterwarnings('ignore', message='torch.distributed is disabled, unavailable or uninitialized')


class UsageError(ValueError):
    """Bad input the user can fix; reported as one line, without a traceback."""


# ----------------------------------------------------------------------------- distributed setup

def setup_distributed():
    """-> (rank, world_size, device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without them, one plain process."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo')
    return dist.get_rank(), dist.get_world_size(), device


def build_model(args, device, seed, init_state=None, compile=False, activation_checkpointing=False):
    """
    Build the Transformer on the meta device (no memory), then materialise it.
    init_state: a full state dict to start from (on rank 0; other ranks pass {}), or None for random init.

    Under torchrun each block, then the root, is wrapped with FSDP2's fully_shard: a block's
    weights are all-gathered just before it runs and freed after, gradients are reduce-scattered.
    On CUDA the shards are materialised directly, so a 7B model never exists whole on one GPU;
    compute runs in bf16 while the weights, gradient reduction and optimizer stay in fp32.
    On CPU (small models, tests) every rank first builds the whole model from the same seed and
    then shards it, so the initial weights, and hence the losses, do not depend on world_size.
    """
    with torch.device('meta'):
        model = Transformer(args)
    for block in model.layers:
        if activation_checkpointing:
            # keep only each block's input; its activations are recomputed during backward
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        if compile:
            block.compile()

    def materialise():
        model.to_empty(device=device)
        torch.manual_seed(seed)
        model.init_weights()

    sharded = dist.is_initialized()
    if sharded and device.type == 'cuda':
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        materialise()
    elif sharded:
        materialise()
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    else:
        materialise()
    if init_state is not None:
        # rank 0 holds the full weights; each rank receives just its shards
        set_model_state_dict(model, init_state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=sharded))
    return model


def read_init_weights(path, rank, world_size):
    """Read a .pt checkpoint or HF model dir to start from (model.load_model) on rank 0 only.
    -> (ModelArgs, full state dict on rank 0 and {} elsewhere, tokenizer spec), ready for build_model.
    Bad input raises UsageError on every rank, so no rank is left waiting for the others."""
    payload, state = [None], {}
    if rank == 0:
        try:
            source, tokenizer_spec = load_model(path)
            payload, state = [(asdict(source.args), tokenizer_spec)], source.state_dict()
        except ModelLoadError as e:
            payload = [str(e)]
    if world_size > 1:
        dist.broadcast_object_list(payload)
    if isinstance(payload[0], str):
        raise UsageError(payload[0])
    args, tokenizer_spec = payload[0]
    return ModelArgs(**args), state, tokenizer_spec


def autocast_context(device):
    """bf16 compute for a plain single-GPU run (FSDP's MixedPrecisionPolicy does it under torchrun)."""
    if device.type == 'cuda' and not dist.is_initialized():
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------- optimisation

def build_optimizer(model, lr, weight_decay, betas, eps, device):
    """AdamW; weight decay on matrices (embeddings, linear weights) only, never on norm gains."""
    params = list(model.parameters())
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=device.type == 'cuda')


def lr_at(step, peak_lr, warmup_steps, max_steps, min_lr_ratio=0.1, decay='cosine'):
    """LR for optimizer step `step` (0-based): linear warmup to peak_lr over warmup_steps,
    then a decay that reaches min_lr_ratio * peak_lr at max_steps: 'cosine' (pre-training)
    or 'linear' (open-instruct's fine-tuning schedule, used by sft.py)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == 'cosine' else 1 - progress
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * shape)


def train_step(model, optimizer, next_batch, grad_accum, lr, grad_clip, device):
    """
    One optimizer step: grad_accum micro-batches of forward/backward, clip, update.
    Returns (loss, grad_norm) as floats, the loss averaged over micro-batches and ranks.
    Skips the update when either is NaN/inf, so the weights stay at their last good values.
    """
    loss_sum = torch.zeros((), device=device)
    for _ in range(grad_accum):
        x, y = next_batch()
        # y is a strided view of the loader's window buffer and model.forward .view()s it (see report)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device):
            _, loss = model(x, targets=y)
        (loss / grad_accum).backward()  # gradients add up over micro-batches
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    stats = torch.stack([loss_sum / grad_accum, grad_norm.float()])
    if dist.is_initialized():
        dist.all_reduce(stats)  # sum of losses over ranks; every rank already has the same grad norm
        stats[0] /= dist.get_world_size()
    loss, grad_norm = stats.tolist()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        for group in optimizer.param_groups:
            group['lr'] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate(model, loader, n_batches, device):
    """Mean loss over n_batches micro-batches from `loader`, averaged over ranks."""
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        x, y = loader.next_batch()
        with autocast_context(device):
            _, loss = model(x.to(device), targets=y.to(device))
        total += loss
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return total.item() / n_batches


# ----------------------------------------------------------------------------- throughput

def flops_per_token(args, seq_len):
    """Training FLOPs per token: 6 per weight (2 forward + 4 backward) for every matmul weight,
    plus the attention scores and weighted sum, 12 * layers * heads * head_dim * context
    (the PaLM paper's appendix B count). The embedding lookup is not a matmul; a tied
    output head still is."""
    a = args
    attn = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads)  # wq, wo, wk, wv
    ffn = 3 * a.dim * a.hidden_dim
    matmul_params = a.n_layers * (attn + ffn) + a.vocab_size * a.dim
    context = min(seq_len, a.sliding_window or seq_len)
    return 6 * matmul_params + 12 * a.n_layers * a.n_heads * a.head_dim * context


# dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts)
GPU_PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12}


def peak_flops(device):
    """Peak FLOP/s of one rank: the datasheet for known GPUs, else a big matmul measured now
    (float32 on CPU, which is what CPU runs compute in)."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
    n, dtype = (2048, torch.float32) if device.type == 'cpu' else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float('inf')
    for _ in range(5):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- checkpoints

def latest_checkpoint(ckpt_root):
    """The newest complete checkpoint directory under ckpt_root, or None."""
    if not os.path.isdir(ckpt_root):
        return None
    done = sorted(d for d in os.listdir(ckpt_root)
                  if d.startswith('step_') and os.path.exists(os.path.join(ckpt_root, d, 'meta.json')))
    return os.path.join(ckpt_root, done[-1]) if done else None


def resume_checkpoint(resume, ckpt_root):
    """The checkpoint a run starts from: for 'auto' the newest complete one under ckpt_root (None
    if there is none), else `resume` itself, which must be a complete checkpoint directory."""
    if resume == 'auto':
        return latest_checkpoint(ckpt_root)
    if os.path.exists(os.path.join(resume, 'meta.json')):
        return resume
    raise UsageError(f"resume={resume}: not a complete checkpoint directory (use 'auto' or a checkpoints/step_* dir)")


def save_train_state(ckpt_root, step, model, optimizer, meta, rank_state, keep_last):
    """
    Write ckpt_root/step_{step}: model and optimizer (each rank writes only its own shards),
    per-rank state (RNG, data loader position) and, last, meta.json with everything else.
    A kill at any point leaves either no meta.json (ignored on resume) or a complete checkpoint.
    Then delete all but the newest keep_last complete checkpoints, and leftovers of failed saves.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = os.path.join(ckpt_root, f'step_{step:08d}')
    if rank == 0 and os.path.exists(path):
        shutil.rmtree(path)  # an interrupted earlier save of this very step
    if dist.is_initialized():
        dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {'model': model_sd, 'optim': optim_sd, f'rank{rank}': _rank_state(rank_state)}
    dcp.save(state, checkpoint_id=path, no_dist=not dist.is_initialized())  # returns once every rank has written
    if os.environ.get('PRETRAIN_TEST_HANG_IN_SAVE') == str(step):
        time.sleep(3600)  # test hook: freeze between the shards and meta.json so a test can kill us here
    if rank == 0:
        _write_json_atomic(os.path.join(path, 'meta.json'), {**meta, 'step': step})
        complete = sorted(d for d in os.listdir(ckpt_root) if os.path.exists(os.path.join(ckpt_root, d, 'meta.json')))
        for d in os.listdir(ckpt_root):
            if d not in complete[-keep_last:] and d < os.path.basename(path):
                shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def load_train_state(path, model, optimizer, loader):
    """Load a checkpoint written by save_train_state in place: model, optimizer, RNG, and the
    loader's position (train_loop saves it as rank_state['loader']). -> (step, tokens)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(path, 'meta.json')) as f:
        meta = json.load(f)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if meta['world_size'] != world_size:
        raise UsageError(f"{path} was written by {meta['world_size']} ranks, this run has {world_size}: "
                         f"resume with the same number of processes (the data position is per rank)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {'model': model_sd, 'optim': optim_sd, f'rank{rank}': _rank_state({})}  # templates, loaded in place
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optim'])
    mine = state[f'rank{rank}']
    torch.set_rng_state(mine['rng_cpu'])
    if 'rng_cuda' in mine:
        torch.cuda.set_rng_state(mine['rng_cuda'])
    try:
        loader.load_state_dict(json.loads(mine['user'])['loader'])
    except ValueError as e:  # batch_size, block_size or the data changed since the checkpoint
        raise UsageError(f"{path}: {e}") from None
    return meta['step'], meta['tokens']


def _rank_state(user_state):
    state = {'rng_cpu': torch.get_rng_state(), 'user': json.dumps(user_state)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['rng_cuda'] = torch.cuda.get_rng_state()
    return state


def _write_json_atomic(path, obj):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


def save_final(model, path, tokenizer, hf_dir=None, **extra):
    """Gather the full weights onto rank 0 (CPU) and write one model.save_checkpoint file
    (plus an HF directory when hf_dir is given). Every rank must call this."""
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    save_checkpoint(path, model, tokenizer.spec, state_dict=state_dict, **extra)
    if hf_dir:
        write_hf_dir(model, hf_dir, state_dict=state_dict, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
        tokenizer.save_hf(hf_dir)


# ----------------------------------------------------------------------------- the run

def launch(train, script_globals, keys):
    """The entry point of pretrain.py and sft.py: read the config (a file and --key=value, see
    configurator.py) into the script's globals, join the process group when under torchrun, run
    train(config, rank, world_size, device), and turn a UsageError into one line and exit code 2."""
    from configurator import configure
    configure(script_globals, keys)
    config = {k: script_globals[k] for k in keys}
    rank, world_size, device = setup_distributed()
    try:
        train(config, rank, world_size, device)
    except UsageError as e:
        if rank == 0:
            print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(config, rank, world_size, device):
    master = rank == 0
    t_start = time.time()
    ckpt_root = os.path.join(out_dir, 'checkpoints')

    # ---- inputs: check everything cheap before building anything
    if not (os.path.exists(os.path.join(data_dir, 'meta.json')) and glob.glob(os.path.join(data_dir, 'train_*.bin'))):
        raise UsageError(f"no token shards in {data_dir}: run `python data.py` first "
                         f"(or set data_dir to the out_dir of a finished data.py run)")
    with open(os.path.join(data_dir, 'meta.json')) as f:
        data_meta = json.load(f)
    tokenizer = Tokenizer.load(data_meta['tokenizer'])
    if export_hf and tokenizer.kind == 'tiktoken':  # found out now rather than after the run
        raise UsageError(f"export_hf: tokenizer {tokenizer.spec} cannot be saved in HF format")
    if init_from and not os.path.exists(init_from):
        raise UsageError(f"init_from={init_from}: no such file or directory")
    resume_path = resume_checkpoint(resume, ckpt_root)

    # ---- the model's shape and starting weights: own checkpoint (resume) > init_from > random
    init_state = None
    if resume_path:
        with open(os.path.join(resume_path, 'meta.json')) as f:
            args = ModelArgs(**json.load(f)['model_args'])
    elif init_from:
        args, init_state, _ = read_init_weights(init_from, rank, world_size)
    else:
        try:
            args = model_args(preset, **model_overrides)
        except (TypeError, ValueError) as e:  # unknown preset or ModelArgs field
            raise UsageError(f"preset={preset!r} model_overrides={model_overrides}: {e}") from None
    if block_size > args.max_seq_len:
        raise UsageError(f"block_size={block_size} is larger than the model's max_seq_len={args.max_seq_len}")
    if data_meta['vocab_size'] > args.vocab_size:
        raise UsageError(f"the shards' tokenizer has {data_meta['vocab_size']} tokens, the model only {args.vocab_size}")

    model = build_model(args, device, seed, init_state, compile, activation_checkpointing)
    del init_state
    optimizer = build_optimizer(model, lr, weight_decay, betas, eps, device)
    try:
        train_loader = PackedLoader(data_dir, 'train', block_size, batch_size, rank, world_size, seed)
    except ValueError as e:  # e.g. too little data for one batch
        raise UsageError(str(e)) from None
    step, tokens = load_train_state(resume_path, model, optimizer, train_loader) if resume_path else (0, 0)

    tokens_per_step = batch_size * grad_accum * world_size * block_size
    has_val = bool(glob.glob(os.path.join(data_dir, 'val_*.bin')))
    if master:
        origin = f"resumed from {resume_path}" if resume_path else f"init from {init_from}" if init_from else "random init"
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {origin}, "
              f"{world_size} x {device.type}{' (FSDP2)' if dist.is_initialized() else ''}")
        print(f"global batch: {batch_size} x {grad_accum} accum x {world_size} ranks = "
              f"{batch_size * grad_accum * world_size} sequences x {block_size} = {tokens_per_step:,} tokens/step; "
              f"{max_steps} steps = {max_steps * tokens_per_step:,} tokens")

    def validate():
        if has_val and eval_batches > 0:
            val_loader = PackedLoader(data_dir, 'val', block_size, batch_size, rank, world_size, seed)
            return evaluate(model, val_loader, eval_batches, device)

    step, tokens = train_loop(model, optimizer, train_loader, device, config, max_steps,
                              lambda s: lr_at(s, lr, warmup_steps, max_steps, min_lr_ratio), tokenizer,
                              {'model_args': asdict(args), 'world_size': world_size, 'config': config},
                              step, tokens, validate, eval_interval)
    if master:
        print(f"done: {step} steps, {tokens:,} tokens in {time.time() - t_start:.0f}s; wrote {out_dir}/final.pt"
              f"{' and ' + os.path.join(out_dir, 'hf') if export_hf else ''}. Try: python sample.py --ckpt {out_dir}/final.pt")


def train_loop(model, optimizer, loader, device, config, max_steps, lr_of, tokenizer, meta, step=0, tokens=0,
               validate=None, eval_interval=0, desc='pretrain'):
    """
    The training loop of pretrain.py and sft.py: optimizer steps from `step` to max_steps on
    batches from `loader` (next_batch() -> (x, y); its state_dict() is saved with every
    checkpoint), then config['out_dir']/final.pt. Returns (step, tokens).
      lr_of(step)   the learning rate of each step
      tokenizer     the data's tokenizer (data.Tokenizer), recorded with every checkpoint
      meta          what else every checkpoint records: model_args, world_size, config
      validate()    a validation loss (or None), every eval_interval steps and at the end
    From config: out_dir, grad_accum, grad_clip, log_interval, ckpt_interval, keep_last, export_hf.
    SIGINT/SIGTERM finish the step, checkpoint and exit 128 + signal; a NaN/inf loss stops the
    run (exit 1) without saving, so the newest checkpoint stays the newest good one.
    """
    out_dir, grad_accum, grad_clip = config['out_dir'], config['grad_accum'], config['grad_clip']
    log_interval, ckpt_interval, keep_last = config['log_interval'], config['ckpt_interval'], config['keep_last']
    master = not dist.is_initialized() or dist.get_rank() == 0
    world_size = meta['world_size']
    ckpt_root = os.path.join(out_dir, 'checkpoints')
    t_start = time.time()
    peak = peak_flops(device) * world_size
    if master:
        print(f"peak: {peak / 1e12:.2f} TFLOP/s over {world_size} rank(s) "
              f"({'datasheet' if device.type == 'cuda' else 'measured float32 matmul'})")
        os.makedirs(out_dir, exist_ok=True)
        log_file = open(os.path.join(out_dir, 'log.jsonl'), 'a')

    def log(record, line):
        """One record to log.jsonl and one line to the terminal (rank 0 only)."""
        if master:
            log_file.write(json.dumps(record) + '\n')
            log_file.flush()
            tqdm.write(line)

    def checkpoint_now():
        save_train_state(ckpt_root, step, model, optimizer, {**meta, 'tokenizer': tokenizer.spec, 'tokens': tokens},
                         {'loader': loader.state_dict()}, keep_last)

    def run_validation():
        val_loss = validate() if validate else None
        if val_loss is not None:
            log({'step': step, 'val_loss': val_loss}, f"step {step}: val loss {val_loss:.4f}")

    # the work each batch costs, counted as it is drawn: SFT batches differ in length
    work = [0, 0.0]  # tokens, FLOPs on this rank in this step
    def next_batch():
        x, y = loader.next_batch()
        work[0] += x.numel()
        work[1] += flops_per_token(model.args, x.shape[1]) * x.numel()
        return x, y

    # SIGINT (Ctrl-C) / SIGTERM (scheduler preemption): finish the step, checkpoint, exit
    received = []
    def on_signal(signum, frame):
        received.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops at once
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    pbar = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True, desc=desc)
    saved_step, busy_time, busy_tokens, busy_flops = step, 0.0, 0, 0.0
    while step < max_steps:
        if eval_interval and step % eval_interval == 0:
            run_validation()
        t0 = time.perf_counter()
        step_lr = lr_of(step)
        work[:] = [0, 0.0]
        loss, grad_norm = train_step(model, optimizer, next_batch, grad_accum, step_lr, grad_clip, device)
        step_work = torch.tensor(work, dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(step_work)
        step_tokens, step_flops = step_work.tolist()
        busy_time += time.perf_counter() - t0
        busy_tokens += step_tokens
        busy_flops += step_flops
        step += 1
        tokens += int(step_tokens)
        pbar.update()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if master:
                pbar.close()
                print(f"error: step {step}: loss {loss}, grad norm {grad_norm}: training diverged, stopping without "
                      f"saving; the newest good checkpoint is {latest_checkpoint(ckpt_root)} "
                      f"(lower lr or raise warmup_steps, then resume from it)", file=sys.stderr)
            sys.exit(1)
        if step % log_interval == 0 or step == max_steps:
            tokens_per_s, mfu = busy_tokens / busy_time, busy_flops / busy_time / peak
            log({'step': step, 'loss': loss, 'lr': step_lr, 'grad_norm': grad_norm, 'tokens': tokens,
                 'tokens_per_s': tokens_per_s, 'mfu': mfu, 'time': time.time() - t_start},
                f"step {step}: loss {loss:.4f} | lr {step_lr:.2e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}%")
            busy_time, busy_tokens, busy_flops = 0.0, 0, 0.0
        stop = torch.tensor(received[:1] or [0], device=device)
        if world_size > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # one rank signalled: all stop at the same step
        if stop.item():
            checkpoint_now()
            if master:
                pbar.close()
                print(f"stopped by signal {stop.item()} at step {step}; checkpoint saved, "
                      f"run the same command again to resume")
            sys.exit(128 + stop.item())
        if step % ckpt_interval == 0:
            checkpoint_now()
            saved_step = step
    pbar.close()

    run_validation()
    if saved_step != step:
        checkpoint_now()
    hf_dir = os.path.join(out_dir, 'hf') if config['export_hf'] else None
    save_final(model, os.path.join(out_dir, 'final.pt'), tokenizer, hf_dir, step=step, tokens=tokens, config=config)
    return step, tokens


if __name__ == '__main__':
    launch(train, globals(), config_keys)
