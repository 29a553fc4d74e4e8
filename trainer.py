"""
The training machinery every stage shares. pretrain.py, sft.py, dpo.py and grpo.py each read
their own data and define their own loss; the rest is here, in the order a run uses it:

    launch(main, globals(), keys)    read the config, join torchrun's process group, run main();
                                     bad input (UsageError) -> one line on stderr, exit code 2
    starting_weights, build_model    the starting weights; the model, sharded with FSDP2 under torchrun
    build_optimizer, lr_at           AdamW (decay on matrices only); warmup + cosine/linear decay
    grad_accum_for                   the accumulation that makes a recipe's global batch on this many ranks
    train_step(model, optimizer, micro_batches, loss_fn, lr, grad_clip)
                                     one optimizer step over grad_accum micro-batches
    find_checkpoint, Run             out_dir: log.jsonl, resumable checkpoints, signals, final.pt

A loss function is `loss_fn(model, batch) -> (loss_sum, count, metrics)`: the loss summed over
the batch's terms (tokens for a language-model loss, pairs for DPO), how many terms, and a dict
of other sums to log per term. train_step divides by the count of the whole step, over every
micro-batch and rank, so an optimizer step is the same whatever the world size and accumulation
(torchtitan normalises by the global token count the same way). A batch is a tuple whose first
element is the input ids [B, T]: that is what the tokens/s and MFU counts read.
"""
import datetime
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

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch._guards import active_fake_mode
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from configurator import configure
from model import ModelArgs, Transformer, model_args
from weights import ModelLoadError, export_hf, load_model, save_checkpoint

# DCP warns on every single-process save/load that no process group exists; that is intended here
warnings.filterwarnings('ignore', message='torch.distributed is disabled, unavailable or uninitialized')


class UsageError(ValueError):
    """Bad input the user can fix; reported as one line, without a traceback."""


# ----------------------------------------------------------------------------- the entry point

def setup_distributed(timeout_min=10):
    """-> (rank, world_size, device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without them, one plain process.
    timeout_min: how long a rank waits at a collective for the others before the run is aborted
    (NCCL's watchdog); 10 minutes is PyTorch's default."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    timeout = datetime.timedelta(minutes=timeout_min)
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device, timeout=timeout)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo', timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def launch(main, script_globals, keys):
    """Run a training script: apply its config file and --key=value overrides to its settings
    (the globals named by keys, see configurator.py), join the process group when under torchrun,
    call main(rank, world_size, device), and turn a UsageError into one line and exit code 2."""
    configure(script_globals, keys)
    # a stage whose ranks can be minutes apart (grpo.py: rollouts of different lengths) sets its own
    rank, world_size, device = setup_distributed(script_globals.get('dist_timeout_min', 10))
    try:
        main(rank, world_size, device)
    except UsageError as e:
        if rank == 0:
            print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- the model

def starting_weights(init_from, rank, world_size, resume_path=None):
    """The model's shape, starting weights and tokenizer spec -> (ModelArgs, state dict, spec).
    init_from (a .pt checkpoint, HF model dir or hub id; weights.load_model) is read on rank 0 only:
    the full state dict there, {} on the other ranks, ready for build_model. When resuming, the shape
    and tokenizer are resume_path's and the state is None (Run.start loads the checkpoint's weights).
    Bad input raises UsageError on every rank, so no rank is left waiting for the others."""
    if resume_path:
        saved = checkpoint_meta(resume_path)
        return ModelArgs(**saved['model_args']), None, saved['tokenizer']
    payload, state = [None], {}
    if rank == 0:
        try:
            source, tokenizer_spec = load_model(init_from)
            payload, state = [(asdict(source.args), tokenizer_spec)], source.state_dict()
        except ModelLoadError as e:
            payload = [str(e)]
    if world_size > 1:
        dist.broadcast_object_list(payload)
    if isinstance(payload[0], str):
        raise UsageError(payload[0])
    args, tokenizer_spec = payload[0]
    return ModelArgs(**args), state, tokenizer_spec


def preset_args(preset, overrides):
    """A model shape from scratch: model.PRESETS[preset] with ModelArgs overrides, or a UsageError."""
    try:
        return model_args(preset, **overrides)
    except (TypeError, ValueError) as e:  # unknown preset or ModelArgs field
        raise UsageError(f"preset={preset!r} model_overrides={overrides}: {e}") from None


def check_hf_export(tokenizer, export_hf):
    """export_hf needs a tokenizer HF can load: found out before the run rather than after it."""
    if export_hf and tokenizer.kind == 'tiktoken':
        raise UsageError(f"export_hf: tokenizer {tokenizer.spec} cannot be saved in HF format")


def fsdp_precision(device_type):
    """FSDP2's precision on a device: on CUDA compute in bf16 (each block's weights are all-gathered
    as bf16) while the weights, the gradient reduction and the optimizer stay fp32; CPU computes in
    fp32 throughout (its bf16 matmuls are slow)."""
    if device_type == 'cuda':
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def build_model(args, device, seed, init_state=None, compile=False, activation_checkpointing=False, fsdp=None,
                matmul_dtype=None):
    """
    Build the Transformer on the meta device (no memory), then materialise it.
    init_state: a full state dict to start from (on rank 0; other ranks pass {}), or None for random init.

    Each block is wrapped in order: activation checkpointing (a wrapper module that keeps only the
    block's input and recomputes the rest during backward), then torch.compile with fullgraph=True
    (a graph break is an error, not a silent fall back to eager), then, under torchrun, FSDP2's
    fully_shard, then the root: a block's weights are all-gathered just before it runs and freed
    after, gradients are reduce-scattered. The wrappers keep the state-dict keys unchanged.

    On CUDA the shards are materialised directly, so a 7B model never exists whole on one GPU, and
    initialised in place (DTensor's CUDA RNG offsets each shard's draws by its place in the full
    tensor, so the ranks agree). On CPU (small models, tests) it cannot, so every rank first builds
    the whole model from the same seed and then shards it: the initial weights, and the losses, do
    not depend on world_size. Fake tensors (dryrun.py) have no values to keep equal: they take the
    CUDA path.
    fsdp: (device mesh, MixedPrecisionPolicy) to shard with; default: all ranks, fsdp_precision(device).
    matmul_dtype: the nn.Linear weights' dtype, for a model that is never trained (grpo.py's reference):
    bf16 where every forward computes in bf16 anyway. Default: fp32, as everything else.
    """
    with torch.device('meta'):
        model = Transformer(args)
    if matmul_dtype is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(torch.empty_like(module.weight, dtype=matmul_dtype))  # still meta
    for i, block in enumerate(model.layers):
        if activation_checkpointing:
            # a module, not a patched forward: torch.utils.checkpoint called directly turns Dynamo off
            # beneath it, so a compiled block would silently run eagerly
            model.layers[i] = block = checkpoint_wrapper(block)
        if compile:
            block.compile(fullgraph=True)  # in place: no `_orig_mod.` in the parameter names

    sharded = dist.is_initialized()
    mesh, precision = fsdp or (None, fsdp_precision(device.type))
    shard_first = sharded and (device.type != 'cpu' or active_fake_mode() is not None)
    if shard_first:
        _shard(model, mesh, precision)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    if sharded and not shard_first:
        _shard(model, mesh, precision)
    if init_state is not None:
        # rank 0 holds the full weights; each rank receives just its shards
        set_model_state_dict(model, init_state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=sharded))
    return model


def _shard(model, mesh, precision):
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)
    # FSDP gathers the root's weights (embedding, final norm, head) around forward() alone; this
    # method uses them too
    register_fsdp_forward_method(model, 'token_logprobs')


def autocast_context(device):
    """bf16 compute for a plain single-GPU run (FSDP's MixedPrecisionPolicy does it under torchrun)."""
    if torch.device(device).type == 'cuda' and not dist.is_initialized():
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return nullcontext()


def describe_model(model, origin, world_size, device):
    return (f"model: {model.num_params() / 1e6:.1f}M parameters, {origin}, "
            f"{world_size} x {device.type}{' (FSDP2)' if dist.is_initialized() else ''}")


# ----------------------------------------------------------------------------- optimisation

def build_optimizer(model, lr, weight_decay, betas, eps, device):
    """AdamW; weight decay on matrices (embeddings, linear weights) only, never on norm gains."""
    params = list(model.parameters())
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=device.type == 'cuda')


def grad_accum_for(global_batch, batch_size, world_size, unit='sequences'):
    """Micro-batches per optimizer step that make a recipe's global batch on this many ranks:
    global_batch = batch_size x grad_accum x world_size, or a UsageError saying what divides."""
    per_pass = batch_size * world_size
    if global_batch <= 0 or global_batch % per_pass:
        raise UsageError(f"global_batch_size={global_batch} {unit} is not a multiple of batch_size={batch_size} x "
                         f"{world_size} ranks = {per_pass}: change batch_size (or the number of ranks) so that it divides")
    return global_batch // per_pass


def lr_at(step, peak_lr, warmup_steps, max_steps, min_lr_ratio=0.1, decay='cosine'):
    """LR for optimizer step `step` (0-based): linear warmup to peak_lr over warmup_steps,
    then a decay that reaches min_lr_ratio * peak_lr at max_steps: 'cosine' (pre-training)
    or 'linear' (open-instruct's fine-tuning schedule, used by sft.py and dpo.py)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == 'cosine' else 1 - progress
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * shape)


def lm_loss(model, batch):
    """Next-token cross-entropy summed over the target tokens (y = -1: not trained on)."""
    x, y = batch
    logits, _ = model(x)
    loss_sum = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction='sum')
    return loss_sum, (y != -1).sum(), {}


def clip_grad_norm(model, max_norm):
    """Scale the gradients down to a total norm of at most max_norm; -> the norm before clipping, a float.
    Under FSDP2 each rank holds shards: the norm is over all of them, the same number on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def mean_over_ranks(value):
    """The mean over all ranks of a scalar tensor on this rank's device (each rank's loss is over
    its own batches; the logged loss is the global batch's), as a float."""
    value = value.detach().double()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def train_step(model, optimizer, micro_batches, loss_fn, lr, grad_clip):
    """
    One optimizer step: forward/backward each micro-batch, normalise by the step's count over
    all micro-batches and ranks, clip, update. Returns the floats to log: loss and grad_norm,
    each metric of loss_fn per term, and tokens / flops / seconds for the throughput counts.
    A NaN/inf loss or grad norm skips the update; Run.end_step then stops the run without saving.
    """
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    sums = {}  # loss_sum, count, metric sums, tokens, flops: one all-reduce for all of them
    for batch in micro_batches:
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        with autocast_context(device):
            loss_sum, count, metrics = loss_fn(model, batch)
        loss_sum.backward()  # the sum's gradient; divided by the step's count below
        x = batch[0]
        for key, value in {'loss': loss_sum.detach(), 'count': count, **metrics, 'tokens': x.numel(),
                           'flops': flops_per_token(model.args, x.shape[1]) * x.numel()}.items():
            sums[key] = sums.get(key, 0) + torch.as_tensor(value, dtype=torch.float64, device=device)
    keys = list(sums)
    totals = torch.stack([sums[k] for k in keys])
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size > 1:
        dist.all_reduce(totals)
    totals = dict(zip(keys, totals.tolist()))
    count = max(totals.pop('count'), 1.0)
    # FSDP averages gradients over ranks: x world_size / count turns that into the sum / count
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(world_size / count)
    grad_norm = clip_grad_norm(model, grad_clip)
    stats = {k: v / count for k, v in totals.items() if k not in ('tokens', 'flops')}
    stats.update(grad_norm=grad_norm, tokens=totals['tokens'], flops=totals['flops'])
    if math.isfinite(stats['loss']) and math.isfinite(stats['grad_norm']):
        for group in optimizer.param_groups:
            group['lr'] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stats['seconds'] = time.perf_counter() - t0
    return stats


@torch.no_grad()
def evaluate(model, loader, n_batches, device):
    """Mean loss over n_batches micro-batches from `loader`, averaged over ranks."""
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        x, y = loader.next_batch()
        with autocast_context(device):
            _, loss = model(x.to(device), targets=y.to(device))
        total += loss
    return mean_over_ranks(total) / n_batches


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


# dense bf16 tensor-core peaks from the vendors' datasheets, by a part of torch.cuda.get_device_name()
# (the first match wins: the PCIe and NVL parts before the SXM one)
GPU_PEAK_FLOPS = {'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


def datasheet_peak(device_name):
    """The dense bf16 peak FLOP/s of a GPU by its name, or None for a GPU not in the table."""
    return next((peak for part, peak in GPU_PEAK_FLOPS.items() if part in device_name), None)


def peak_flops(device):
    """Peak FLOP/s of one rank: the datasheet for known GPUs, else a big matmul measured now
    (float32 on CPU, which is what CPU runs compute in)."""
    if device.type == 'cuda' and datasheet_peak(torch.cuda.get_device_name(device)):
        return datasheet_peak(torch.cuda.get_device_name(device))
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


def find_checkpoint(resume, out_dir):
    """The checkpoint a run starts from: for 'auto' the newest complete one under out_dir (None
    if there is none), else the given directory, which must be a complete checkpoint."""
    if resume == 'auto':
        return latest_checkpoint(os.path.join(out_dir, 'checkpoints'))
    if not os.path.exists(os.path.join(resume, 'meta.json')):
        raise UsageError(f"resume={resume}: not a complete checkpoint directory (no meta.json)")
    return resume


def checkpoint_meta(path):
    """What a checkpoint records besides the tensors (model_args, tokenizer, config, step, ...)."""
    with open(os.path.join(path, 'meta.json')) as f:
        return json.load(f)


def _rank_state(user_state):
    state = {'rng_cpu': torch.get_rng_state(), 'user': json.dumps(user_state)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['rng_cuda'] = torch.cuda.get_rng_state()
    return state


def _write_json_atomic(path, obj):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


class Run:
    """
    One training run: where it stands (step, tokens), what it keeps in out_dir, and what happens
    between its steps.

        log.jsonl                    one JSON record per log interval, per evaluation, per report
        checkpoints/step_NNNNNNNN/   resumable state (torch.distributed.checkpoint: each rank writes
                                     its own shards); meta.json is written last, so a directory
                                     without it is an interrupted save and is ignored on resume
        final.pt                     the trained weights in one file (weights.save_checkpoint)

    meta is what every checkpoint records beside the tensors (model_args, tokenizer, config).
    A stage's loop is: while run.step < max_steps: stats = train_step(...); run.end_step(stats, lr).
    SIGINT/SIGTERM ask the run to stop: end_step finishes the step, saves, and exits 128 + the
    signal. A second SIGTERM is ignored (torchrun and SLURM may each deliver one); a second
    Ctrl-C stops at once.
    """

    def __init__(self, out_dir, meta, log_interval=10, ckpt_interval=100, keep_last=2):
        if not (isinstance(keep_last, int) and keep_last >= 0):
            raise UsageError(f"keep_last={keep_last!r}: the number of newest checkpoints to keep, "
                             f"an integer >= 0 (0 keeps every checkpoint)")
        self.out_dir, self.meta = out_dir, meta
        self.log_interval, self.ckpt_interval, self.keep_last = log_interval, ckpt_interval, keep_last
        self.ckpt_root = os.path.join(out_dir, 'checkpoints')
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.master = self.rank == 0
        self.step = self.tokens = 0
        self.signal_received = 0
        self.pbar = None

    def start(self, model, optimizer, loader, resume_path, max_steps, desc):
        """Begin (or, from resume_path, continue) training `model`: restore the checkpoint, open
        log.jsonl, catch SIGINT/SIGTERM, show a progress bar. -> (step, tokens) it starts from."""
        self.model, self.optimizer, self.loader, self.max_steps = model, optimizer, loader, max_steps
        self.device = next(model.parameters()).device
        if resume_path:
            self._load(resume_path)
        self.t_start = time.time()
        self.peak = peak_flops(self.device) * self.world_size
        self.busy = {'seconds': 0.0, 'tokens': 0.0, 'flops': 0.0}  # since the last log line
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        if self.master:
            os.makedirs(self.out_dir, exist_ok=True)
            self.log_file = open(os.path.join(self.out_dir, 'log.jsonl'), 'a')
            print(f"peak: {self.peak / 1e12:.2f} TFLOP/s over {self.world_size} rank(s) "
                  f"({'datasheet' if self.device.type == 'cuda' else 'measured float32 matmul'})")
        self.pbar = tqdm(total=max_steps, initial=self.step, disable=not self.master, dynamic_ncols=True, desc=desc)
        return self.step, self.tokens

    def _on_signal(self, signum, frame):
        if self.signal_received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        self.signal_received = self.signal_received or signum

    def log(self, record, line=None):
        """One record to log.jsonl and one line to the terminal (rank 0 only)."""
        if self.master:
            self.log_file.write(json.dumps(record) + '\n')
            self.log_file.flush()
            if line:
                tqdm.write(line)

    def end_step(self, stats, lr):
        """After each optimizer step (stats from train_step): count it, stop the run when its
        loss or grad norm is not finite (exit 1, saving nothing: the newest checkpoint stays
        good), log every log_interval steps, stop on a signal, checkpoint every ckpt_interval."""
        self.step += 1
        self.tokens += int(stats['tokens'])
        for key in self.busy:
            self.busy[key] += stats[key]
        self.pbar.update()
        if not (math.isfinite(stats['loss']) and math.isfinite(stats['grad_norm'])):
            if self.master:
                self.pbar.close()
                print(f"error: step {self.step}: loss {stats['loss']}, grad norm {stats['grad_norm']}: training "
                      f"diverged, stopping without saving; the newest good checkpoint is "
                      f"{latest_checkpoint(self.ckpt_root)} (lower lr or raise warmup_steps, then resume from it)",
                      file=sys.stderr)
            sys.exit(1)
        if self.step % self.log_interval == 0 or self.step == self.max_steps:
            self._log_step(stats, lr)
        self.stop_if_signalled()
        if self.step % self.ckpt_interval == 0:
            self.save()

    def _log_step(self, stats, lr):
        """The step's numbers, with tokens/s and MFU over the steps since the last log line."""
        busy, self.busy = self.busy, dict.fromkeys(self.busy, 0.0)
        tokens_per_s, mfu = busy['tokens'] / busy['seconds'], busy['flops'] / busy['seconds'] / self.peak
        logged = {k: v for k, v in stats.items() if k not in ('tokens', 'flops', 'seconds')}
        extra = ''.join(f" | {k} {v:.4f}" for k, v in logged.items() if k not in ('loss', 'grad_norm'))
        self.log({'step': self.step, **logged, 'lr': lr, 'tokens': self.tokens, 'tokens_per_s': tokens_per_s,
                  'mfu': mfu, 'time': time.time() - self.t_start},
                 f"step {self.step}: loss {stats['loss']:.4f}{extra} | lr {lr:.2e} | grad norm "
                 f"{stats['grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}%")

    def stop_if_signalled(self, rewind=None):
        """If any rank has received SIGINT/SIGTERM: save the run as it stands after its last finished
        step and exit 128 + the signal. end_step calls it; a stage with long steps calls it within a
        step as well (grpo.py between rollout chunks), with rewind() putting its loader back to where
        that step began. A collective: every rank calls it at the same points."""
        signum = self._signalled()
        if signum:
            if rewind:
                rewind()
            self.save()
            if self.master:
                self.pbar.close()
                dropped = ' (the step in progress is dropped)' if rewind else ''
                print(f"stopped by signal {signum} at step {self.step}{dropped}; checkpoint saved, "
                      f"run the same command again to resume")
            sys.exit(128 + signum)

    def _signalled(self):
        """The signal any rank has received, or 0: every rank stops at the same step."""
        signum = torch.tensor(self.signal_received, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return signum.item()

    def save(self):
        """
        Write checkpoints/step_{step}: model and optimizer (each rank writes only its own shards),
        per-rank state (RNG, data loader position) and, last, meta.json with everything else.
        A kill at any point leaves either no meta.json (ignored on resume) or a complete checkpoint.
        Then delete all but the newest keep_last complete checkpoints (keep_last=0: keep them all),
        and leftovers of failed saves.
        """
        path = os.path.join(self.ckpt_root, f'step_{self.step:08d}')
        if self.master and os.path.exists(path):
            shutil.rmtree(path)  # an interrupted earlier save of this very step
        if dist.is_initialized():
            dist.barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        rank_state = _rank_state({'loader': self.loader.state_dict()})
        dcp.save({'model': model_sd, 'optim': optim_sd, f'rank{self.rank}': rank_state},
                 checkpoint_id=path, no_dist=not dist.is_initialized())  # returns once every rank has written
        if self.master:
            _write_json_atomic(os.path.join(path, 'meta.json'), {**self.meta, 'world_size': self.world_size,
                                                                 'step': self.step, 'tokens': self.tokens})
            complete = sorted(d for d in os.listdir(self.ckpt_root)
                              if os.path.exists(os.path.join(self.ckpt_root, d, 'meta.json')))
            kept = complete[-self.keep_last:] if self.keep_last else complete
            for d in os.listdir(self.ckpt_root):
                if d not in kept and d < os.path.basename(path):
                    shutil.rmtree(os.path.join(self.ckpt_root, d), ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()

    def _load(self, path):
        """Load a checkpoint written by save() in place: model, optimizer, RNG, the loader's position."""
        meta = checkpoint_meta(path)
        if meta['world_size'] != self.world_size:
            raise UsageError(f"{path} was written by {meta['world_size']} ranks, this run has {self.world_size}: "
                             f"resume with the same number of processes (the data position is per rank)")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {'model': model_sd, 'optim': optim_sd, f'rank{self.rank}': _rank_state({})}  # templates, loaded in place
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        set_state_dict(self.model, self.optimizer, model_state_dict=state['model'], optim_state_dict=state['optim'])
        mine = state[f'rank{self.rank}']
        torch.set_rng_state(mine['rng_cpu'])
        if 'rng_cuda' in mine:
            torch.cuda.set_rng_state(mine['rng_cuda'])
        try:
            self.loader.load_state_dict(json.loads(mine['user'])['loader'])
        except ValueError as e:  # batch_size, block_size or the data changed since the checkpoint
            raise UsageError(f"{path}: {e}") from None
        self.step, self.tokens = meta['step'], meta['tokens']

    def finish(self, tokenizer, with_hf=False):
        """The end of a run: checkpoint the last step (unless just saved), then gather the full
        weights onto rank 0 and write out_dir/final.pt (and an HF directory, out_dir/hf)."""
        self.pbar.close()
        if latest_checkpoint(self.ckpt_root) != os.path.join(self.ckpt_root, f'step_{self.step:08d}'):
            self.save()
        state_dict = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.master:
            return
        save_checkpoint(os.path.join(self.out_dir, 'final.pt'), self.model, tokenizer.spec, state_dict=state_dict,
                        step=self.step, tokens=self.tokens, config=self.meta.get('config', {}))
        if with_hf:
            hf_dir = os.path.join(self.out_dir, 'hf')
            export_hf(self.model, hf_dir, state_dict=state_dict, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
            tokenizer.save_hf(hf_dir)
