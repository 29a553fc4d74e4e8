"""
The CUDA path, checked and measured by one command on one GPU, within a time budget it keeps itself:

    python tests/gpu_check.py                         # writes gpu_check.json and prints a table

Six parts, each in a process of its own under its own time limit: a part that fails, hangs or runs
out of time is reported as such, with whatever it measured until then, and the next part runs.

    correctness  masked and causal GQA attention == attention written out (fp32 and bf16); cached
                 decode == the full forward (bf16); greedy generate on the GPU == on the CPU in
                 float32 (tiny model); FSDP2 on a 1-rank NCCL group takes a step == the plain model
    kernels      the SDPA kernel that runs causal GQA attention at 2k and the windowed (masked) case,
                 read off the profiler's kernel names: flash, cudnn, efficient or math
    train        tokens/s and MFU of a 7B slice (moxin-7b's dim, heads, hidden and vocabulary with
                 `layers` of its 36 blocks), batch_size x 2048 tokens, bf16, FSDP2 on one GPU:
                 eager and compiled, each with activation checkpointing off and on
    memory       the train part's peak (torch.cuda.max_memory_allocated) over the dry run's prediction
                 (dryrun.simulate) for the same slice and settings: the dry run's calibration
    decode       model.generate vs transformers' generate on the same weights (bf16) at batch 1 and 64;
                 GRPO-shaped rollouts (prompts x group_size rows) at the demo's shape and a 7B-slice shape
    eval         multiple-choice items/s of `eval.py` vs lm-evaluation-harness's HFLM on a synthetic
                 PIQA-like task written here (7B slice), and how many answers agree

On a CPU the same command runs end to end in under a minute (about 25 s of CPU time on 2 cores): what
needs CUDA is reported as skipped and the rest runs at toy size (the tiny preset), which walks the
code paths but measures nothing worth reading. Random weights and synthetic data throughout: nothing
is downloaded. docs/gpu-check.md says how to read the JSON.
"""
import contextlib
import copy
import functools
import gc
import io
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager

# The parts run in forked children, and a process that has initialised CUDA cannot fork one that
# uses it: with this, torch.cuda.is_available() asks NVML and leaves CUDA alone (the parent never
# asks, but no import of it may either).
os.environ.setdefault('PYTORCH_NVML_BASED_CUDA_CHECK', '1')
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
from bench import race  # noqa: E402  (ours and the reference timed back to back, alternating)
from configurator import settings  # noqa: E402
from dryrun import Setup, simulate  # noqa: E402
from model import KVCache, Sampling, Transformer, attend, generate, model_args, window_mask  # noqa: E402
from trainer import build_model, build_optimizer, datasheet_peak, flops_per_token, lm_loss, train_step  # noqa: E402
from weights import export_hf  # noqa: E402

# ----------------------------------------------------------------------------- settings
out = 'gpu_check.json'        # the JSON with every number; the table goes to stdout
budget_s = 480                # the whole run; a part also stops at its own limit (LIMITS)
parts = 'correctness,kernels,train,memory,decode,eval'  # a subset reruns only those
limits = {}                   # seconds per part over LIMITS', e.g. --limits="dict(train=300)"
layers = 12                   # the 7B slice: this many of moxin-7b's 36 blocks, 2.88B parameters; the dry run
                              # puts batch_size=4 at 54 GiB without activation checkpointing, 45 GiB with
batch_size = 4                # sequences of 2048 tokens per training step
steps = 5                     # timed training steps per setting, after 2 untimed ones (the first compiles)
config_keys = settings(globals())

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A first torch.compile of a block takes 30-60 s on a GPU, and train compiles twice (with and without
# activation checkpointing): it gets the largest share. memory runs the dry run on the CPU.
LIMITS = dict(correctness=40, kernels=25, train=180, memory=40, decode=100, eval=80)
RESERVE_S = 10                # of budget_s, for starting (the imports) and writing the report
# What each part measures on each device; the CPU's sizes only walk the code.
SIZES = {
    # grpo_*: (prompts, group_size, prompt tokens, new tokens, temperature); the demo's as grpo.py's
    # defaults, the slice's a short DeepScaleR-like step (its recipe: 128 prompts x 8, 8k new tokens)
    'cuda': dict(block=2048, attn_T=2048, window_T=8192, window=4096, decode_prompt=128, decode_new=128,
                 decode_rounds=3, grpo_demo=(8, 8, 48, 32, 1.0), grpo_slice=(4, 8, 256, 128, 0.6), grpo_rounds=2,
                 questions=1000),
    'cpu': dict(block=64, attn_T=256, window_T=256, window=64, decode_prompt=16, decode_new=8, decode_rounds=2,
                grpo_demo=(2, 4, 16, 8, 1.0), grpo_slice=(2, 4, 16, 8, 0.6), grpo_rounds=1, questions=32),
}
# a part's checks, in the order it runs them: the JSON has each key whatever happens
KEYS = {'correctness': ['attention_fp32', 'attention_bf16', 'cached_decode', 'generate_gpu_vs_cpu', 'fsdp2_step'],
        'kernels': ['causal_gqa_2k', 'windowed'],
        'train': ['eager', 'eager_ac', 'compile', 'compile_ac'],
        'memory': ['eager', 'eager_ac', 'compile', 'compile_ac'],
        'decode': ['batch_1', 'batch_64', 'grpo_slice', 'grpo_demo'],
        'eval': ['piqa']}
TRAIN_SETTINGS = {'eager': (False, False), 'eager_ac': (False, True),  # key: (compile, activation checkpointing)
                  'compile': (True, False), 'compile_ac': (True, True)}
GIB = 2 ** 30


# ----------------------------------------------------------------------------- the arithmetic

def mfu(args, seq_len, tokens, seconds, peak):
    """Model FLOPs utilisation: the training FLOPs of `tokens` tokens in sequences of seq_len
    (trainer.flops_per_token, the count the training log and the dry run use) done in `seconds`,
    as a fraction of `peak` FLOP/s; None when no peak is known."""
    if not peak:
        return None
    return flops_per_token(args, seq_len) * tokens / seconds / peak


def memory_ratio(measured, predicted):
    """Measured peak bytes over the dry run's predicted peak: above 1, the dry run under-predicts.
    None when either side is missing."""
    if not measured or not predicted:
        return None
    return measured / predicted


def rel_err(out, ref):
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def sdpa_backend(names):
    """Which SDPA kernel ran, from profiler event names (ATen ops and CUDA kernels): 'cudnn', 'flash',
    'efficient' or 'math', or 'unknown'. cuDNN first: its kernel names contain 'flash' too."""
    names = ' '.join(names).lower()
    for backend, marks in (('cudnn', ('cudnn',)), ('flash', ('flash',)),
                           ('efficient', ('efficient_attention', 'fmha_cutlass', 'mem_eff')),
                           ('math', ('_scaled_dot_product_attention_math',))):
        if any(m in names for m in marks):
            return backend
    return 'unknown'


def skipped(reason, **measured):
    return dict(status='skipped', reason=reason, summary=f"skipped: {reason}", **measured)


def fmt_bytes(n):
    return 'n/a' if n is None else f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


# ----------------------------------------------------------------------------- shared pieces

def current_device():
    """CUDA's first device, else the CPU, asked in each part's own process: the parent never touches
    CUDA, so forking it stays safe. On CPU, one thread: toy models run faster on one than on two
    that wait on each other in every small op."""
    if torch.cuda.is_available():
        return torch.device('cuda', 0)
    torch.set_num_threads(1)
    return torch.device('cpu')


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def slice_args(device, n_layers):
    """The 7B slice on CUDA (moxin-7b with n_layers blocks), the tiny preset on CPU."""
    return model_args('moxin-7b', n_layers=n_layers) if device.type == 'cuda' else model_args('tiny')


def describe(args):
    with torch.device('meta'):
        n = Transformer(args).num_params()
    return f"{args.n_layers} layers of dim {args.dim}, {n / 1e6:,.1f}M parameters"


def build(args, device, dtype=torch.float32, seed=0):
    """A Transformer with random weights (model.init_weights), made on the device itself."""
    with torch.device('meta'):
        model = Transformer(args)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model.to(dtype).eval()


def random_ids(rows, length, vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (rows, length), generator=g)


@contextmanager
def one_rank_group(device):
    """A process group of this process alone (NCCL on CUDA, gloo on CPU) on a free local port:
    trainer.build_model then shards with FSDP2, as under torchrun."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1,
                            device_id=device if device.type == 'cuda' else None)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def attempt(report, key, check):
    """report(key, check()); an exception becomes a failed result, and the part goes on."""
    try:
        result = check()
    except Exception as e:
        traceback.print_exc()
        result = dict(status='failed', error=f"{type(e).__name__}: {e}".splitlines()[0])
        result['summary'] = result['error'][:120]
    report(key, result)


# ----------------------------------------------------------------------------- 1. correctness

def written_out_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d) where allowed) v in float64, each key/value head copied for its query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float('-inf')).softmax(-1) @ v


def check_attention(device, dtype, tol):
    """model.attend (its masked GQA path on CUDA copies key/value heads for the fused kernel) ==
    attention written out, for a sliding window past its width and for plain causal attention."""
    B, H, KV, T, hd, W = 2, 8, 2, 512, 64, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, hd, generator=g).to(device, dtype)
    k, v = (torch.randn(B, KV, T, hd, generator=g).to(device, dtype) for _ in range(2))
    pos = torch.arange(T, device=device)[None].expand(B, T)
    errors = {}
    for case, window in (('windowed', W), ('causal', None)):
        allowed = window_mask(pos, pos, window)
        got = attend(q, k, v, allowed) if window else attend(q, k, v, None, causal=True)
        errors[case] = rel_err(got, written_out_attention(q, k, v, allowed))
    ok = max(errors.values()) <= tol
    return dict(status='ok' if ok else 'failed', dtype=str(dtype), rel_err=errors, tol=tol,
                summary=f"rel err windowed {errors['windowed']:.1e}, causal {errors['causal']:.1e} (tol {tol:g})")


def check_cached_decode(device):
    """Logits of a prompt prefilled into the rolling cache and then one token at a time, past the
    window, against the full forward, both in the device's dtype and both against the float32 full
    forward: the cache may add no error beyond the low precision's own (at most 2x it)."""
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    args = model_args('tiny')  # window 8: 40 tokens roll the buffer several times
    model = build(args, device)
    x = random_ids(1, 40, args.vocab_size).to(device)
    low = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        truth, full = model(x)[0], low(x)[0]
        cache = KVCache(args, 1, device, dtype)
        steps = [low.logits(low.hidden(x[:, :12], cache))]
        steps += [low.logits(low.hidden(x[:, t:t + 1], cache)) for t in range(12, x.shape[1])]
    cached = torch.cat(steps, dim=1)
    full_err, cached_err = rel_err(full, truth), rel_err(cached, truth)
    ok = cached_err <= 2 * full_err + 1e-5
    return dict(status='ok' if ok else 'failed', dtype=str(dtype), full_vs_fp32=full_err, cached_vs_fp32=cached_err,
                cached_vs_full=rel_err(cached, full),
                summary=f"{str(dtype)[6:]}: vs fp32 full {full_err:.1e}, cached {cached_err:.1e}")


def first_divergence(model, prompts, want, got):
    """Per row: None if got == want, else (where, fp32 logit gap at that step / the logits' rms):
    greedy decoding may part ways only where the float32 model itself is nearly undecided."""
    found = []
    for prompt, a, b in zip(prompts, want, got):
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i is None:
            found.append(None)
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + a[:i]]))[0][0, -1]
        found.append((i, ((logits[a[i]] - logits[b[i]]) / logits.pow(2).mean().sqrt()).item()))
    return found


def check_generate(device, new=16):
    """Greedy generate of a tiny model on the GPU, float32 and bf16, against the CPU in float32, on
    prompts of different lengths (the masked decode path): the same tokens, or a first difference at
    a near tie (a float32 logit gap under 0.1% of the logits' rms for float32, 5% for bf16; bf16
    rounding alone moves logits by about 1%)."""
    args = model_args('tiny')
    cpu_model = build(args, 'cpu')
    prompts = [random_ids(1, n, args.vocab_size, seed=n)[0].tolist() for n in (5, 9, 13)]
    want = generate(cpu_model, prompts, new)
    result, ok = {}, True
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        got = generate(copy.deepcopy(cpu_model).to(device, dtype), prompts, new)
        found = first_divergence(cpu_model, prompts, want, got)
        ok &= all(f is None or abs(f[1]) < tol for f in found)
        result[str(dtype)[6:]] = dict(same_rows=sum(f is None for f in found), divergences=found, tol=tol)
    summary = ', '.join(f"{k}: {v['same_rows']}/{len(prompts)} rows same" for k, v in result.items())
    return dict(status='ok' if ok else 'failed', new_tokens=new, **result, summary=summary + " (else at a near tie)")


def check_fsdp2_step(device):
    """A training step of trainer.build_model's FSDP2 model on a 1-rank group (bf16 compute on CUDA):
    its loss == the same weights' loss in a plain float32 model, its update finite and applied."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    args = model_args('tiny')
    tol = 2e-2 if device.type == 'cuda' else 1e-5
    with one_rank_group(device) as backend:
        model = build_model(args, device, seed=0)
        full = lambda: {k: v.detach().clone() for k, v in get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True)).items()}
        before = full()
        plain = build(args, device)
        plain.load_state_dict(before)
        ids = random_ids(4, 33, args.vocab_size).to(device)
        batch = (ids[:, :-1], ids[:, 1:])
        with torch.no_grad():
            loss_sum, units, _ = lm_loss(plain, batch)
        want = (loss_sum / units).item()
        optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, device)
        stats = train_step(model, optimizer, [batch], lm_loss, 1e-3, 1.0)
        after = full()
    moved = all(not torch.equal(before[k], after[k]) for k in before)
    finite = all(torch.isfinite(t).all() for t in after.values())
    err = abs(stats['loss'] - want) / want
    ok = err <= tol and moved and finite
    return dict(status='ok' if ok else 'failed', backend=backend, loss=stats['loss'], plain_loss=want, rel_err=err,
                tol=tol, grad_norm=stats['grad_norm'], all_weights_moved=moved, finite=bool(finite),
                summary=f"{backend}: loss {stats['loss']:.4f} vs plain {want:.4f}, every weight updated: {moved}")


def part_correctness(report, cfg, done):
    device = current_device()
    cuda = device.type == 'cuda'
    attempt(report, 'attention_fp32', lambda: check_attention(device, torch.float32, 1e-3))
    if cuda:
        attempt(report, 'attention_bf16', lambda: check_attention(device, torch.bfloat16, 1e-2))
    else:
        report('attention_bf16', skipped('needs CUDA (the CPU computes in float32)'))
    attempt(report, 'cached_decode', lambda: check_cached_decode(device))
    if cuda:
        attempt(report, 'generate_gpu_vs_cpu', lambda: check_generate(device))
    else:
        report('generate_gpu_vs_cpu', skipped('needs CUDA'))
    attempt(report, 'fsdp2_step', lambda: check_fsdp2_step(device))


# ----------------------------------------------------------------------------- 2. kernels

def profile_attention(device, dtype, T, window, args):
    """Forward and backward of model.attend at moxin-7b's heads (or tiny's on CPU) under the
    profiler -> the SDPA backend it ran and the attention kernels' names."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.n_heads, T, args.head_dim, generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn(1, args.n_kv_heads, T, args.head_dim, generator=g).to(device, dtype).requires_grad_()
            for _ in range(2))
    pos = torch.arange(T, device=device)[None]
    mask = None if window is None else window_mask(pos, pos, window)

    def run():
        attend(q, k, v, mask, causal=mask is None).sum().backward()
        synchronize(device)
    run()  # kernel selection and workspace setup out of the way
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        run()
    names = sorted({e.key for e in prof.key_averages()})
    backend = sdpa_backend(names)
    shown = [n for n in names if any(m in n.lower() for m in ('attention', 'flash', 'fmha', 'cudnn', 'sdpa'))]
    shape = f"{args.n_heads} q / {args.n_kv_heads} kv heads, T {T}" + (f", window {window}" if window else ", causal")
    return dict(status='ok', backend=backend, kernels=[n[:160] for n in shown[:12]], dtype=str(dtype), shape=shape,
                summary=f"{backend} ({shape}, {str(dtype)[6:]}, fwd+bwd)")


def part_kernels(report, cfg, done):
    device = current_device()
    s = SIZES[device.type]
    args = model_args('moxin-7b') if device.type == 'cuda' else model_args('tiny')
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    attempt(report, 'causal_gqa_2k', lambda: profile_attention(device, dtype, s['attn_T'], None, args))
    # past the window the model passes a mask (Transformer._mask): the windowed case
    attempt(report, 'windowed', lambda: profile_attention(device, dtype, s['window_T'], s['window'], args))


# ----------------------------------------------------------------------------- 3. train

def train_shape(device, cfg):
    """(model args, sequences per step, tokens per sequence, timed steps) of the train and memory parts."""
    args = slice_args(device, cfg['layers'])
    if device.type == 'cuda':
        return args, cfg['batch_size'], SIZES['cuda']['block'], cfg['steps']
    return args, 2, SIZES['cpu']['block'], 2


def measure_training(args, device, batch, block, steps, compile, checkpointing):
    """trainer.train_step on trainer.build_model's FSDP2 model (inside a process group): the first step's
    seconds (it compiles), then the median of `steps` timed steps after a second untimed one, the
    tokens/s and MFU from it, and the peak memory of the timed steps (the optimizer state exists then)."""
    model = build_model(args, device, 0, compile=compile, activation_checkpointing=checkpointing)
    optimizer = build_optimizer(model, 1e-5, 0.1, (0.9, 0.95), 1e-8, device)
    ids = random_ids(batch, block + 1, args.vocab_size).to(device)
    micro_batches = [(ids[:, :-1], ids[:, 1:])]
    step = lambda: train_step(model, optimizer, micro_batches, lm_loss, 1e-5, 1.0)
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first_s = time.perf_counter() - t0
    step()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        loss = step()['loss']  # train_step reads the loss and grad norm: it waits for the GPU
        synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
    step_s, tokens = statistics.median(times), batch * block
    peak_flops = datasheet_peak(torch.cuda.get_device_name(device)) if device.type == 'cuda' else None
    utilisation = mfu(args, block, tokens, step_s, peak_flops)
    return dict(status='ok', shape=f"{describe(args)}, {batch} x {block} tokens", first_step_s=first_s,
                step_s=step_s, tokens_per_s=tokens / step_s, mfu=utilisation, peak_bytes=peak, loss=loss,
                summary=f"{tokens / step_s:,.0f} tok/s" + (f", MFU {utilisation:.1%}" if utilisation else "")
                + f", peak {fmt_bytes(peak)}, first step {first_s:.1f}s")


def part_train(report, cfg, done):
    device = current_device()
    args, batch, block, n_steps = train_shape(device, cfg)
    eager = []  # tokens/s of the plain setting, the one the others are compared with
    with one_rank_group(device):
        for key, (compile, checkpointing) in TRAIN_SETTINGS.items():
            if compile and device.type != 'cuda':
                report(key, skipped('compile is measured on CUDA only (a first compile takes minutes on 2 cores)'))
                continue

            def measure():
                result = measure_training(args, device, batch, block, n_steps, compile, checkpointing)
                if key == 'eager':
                    eager.append(result['tokens_per_s'])
                result['vs_eager'] = result['tokens_per_s'] / eager[0] if eager else None
                if key != 'eager' and eager:
                    result['summary'] += f", {result['vs_eager']:.2f}x eager"
                return result
            attempt(report, key, measure)
            if compile:
                torch._dynamo.reset()  # the compiled graphs hold on to the last model
            gc.collect()
            if device.type == 'cuda':
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 4. memory

def memory_result(measured, predicted, compiled, missing):
    """One setting's check: the measured peak over the predicted one, or skipped for `missing`."""
    ratio = memory_ratio(measured, predicted)
    if ratio is None:
        return skipped(missing, predicted_bytes=predicted, measured_bytes=measured, ratio=None)
    note = ' (the dry run measures eagerly)' if compiled else ''
    return dict(status='ok', predicted_bytes=predicted, measured_bytes=measured, ratio=ratio,
                summary=f"measured {fmt_bytes(measured)} / predicted {fmt_bytes(predicted)} = {ratio:.3f}{note}")


def part_memory(report, cfg, done):
    """The dry run's prediction (fake tensors on the CPU, eager, as dryrun.py measures) for each train
    setting, against the train part's measured peak."""
    device = current_device()
    args, batch, block, _ = train_shape(device, cfg)
    config = dict(seed=0, lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, block_size=block, grad_clip=1.0)
    trained = done.get('train', {}).get('results', {})
    predicted = {}
    for key, (compile, checkpointing) in TRAIN_SETTINGS.items():
        if checkpointing not in predicted:
            predicted[checkpointing] = simulate(args, config, Setup(1, batch, 1, checkpointing)).peak['Total']
        missing = ("the measured side is CUDA's max_memory_allocated" if device.type != 'cuda'
                   else f"train {key}: {trained.get(key, {}).get('status', 'not run')}")
        report(key, memory_result(trained.get(key, {}).get('peak_bytes'), predicted[checkpointing], compile, missing))


# ----------------------------------------------------------------------------- 5. decode

def quiet_transformers():
    """transformers' progress bars and advice would bury the table."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def hf_twin(model, device, dtype):
    """transformers' MistralForCausalLM with the same weights, through weights.export_hf, generating
    every token it is asked for (no EOS)."""
    transformers = quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp, dtype=dtype)
        hf = transformers.MistralForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation='sdpa')
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None
    return hf


def decode_vs_hf(model, hf, rows, prompt_len, new, rounds):
    """Greedy tokens/s of model.generate vs HF generate for `rows` prompts of prompt_len tokens."""
    device = model.tok_embeddings.weight.device
    ids = random_ids(rows, prompt_len, model.args.vocab_size).to(device)
    prompts, out = ids.tolist(), {}

    def ours():
        out['ours'] = generate(model, prompts, new)

    def ref():
        with torch.no_grad():
            out['ref'] = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                     pad_token_id=0)[:, prompt_len:].tolist()
    return compare_speed(ours, ref, rows * new, rounds, device, out)


def rollout_vs_hf(model, hf, shape, rounds):
    """Sampled tokens/s of a GRPO rollout, as grpo.rollout makes it (all prompts x group_size rows in
    one generate call, each prompt prefilled once, each row drawing from its own generator), vs HF
    generate with num_return_sequences=group_size over all prompts at once (how TRL's GRPO trainer
    generates without vLLM)."""
    n_prompts, group, prompt_len, new, temperature = shape
    device = model.tok_embeddings.weight.device
    ids = random_ids(n_prompts, prompt_len, model.args.vocab_size).to(device)

    def ours():
        generators = [grpo.group_generators(0, 0, slot, group, device) for slot in range(n_prompts)]
        grpo.rollout(model, ids.tolist(), generators, new, Sampling(temperature=temperature), None, n_prompts * group)

    def ref():
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=True,
                        temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=group, pad_token_id=0)
    result = compare_speed(ours, ref, n_prompts * group * new, rounds, device)
    result['shape'] = f"{n_prompts} prompts x {group}, prompt {prompt_len} + {new} tokens, T {temperature}"
    result['summary'] += f" ({result['shape']})"
    return result


def compare_speed(ours, ref, tokens, rounds, device, out=None):
    """Tokens/s of both (medians over alternating rounds after an untimed call each) and ours/ref, the
    median of the per-round ratios; with `out`, how many rows made the same greedy tokens."""
    ours(), ref()
    times = race({'ours': ours, 'ref': ref}, rounds, lambda: synchronize(device))
    ratio = statistics.median(r / o for o, r in zip(times['ours'], times['ref']))
    result = dict(status='ok', ours_tokens_per_s=tokens / statistics.median(times['ours']),
                  hf_tokens_per_s=tokens / statistics.median(times['ref']), ratio=ratio)
    result['summary'] = (f"{result['ours_tokens_per_s']:,.0f} vs HF {result['hf_tokens_per_s']:,.0f} tok/s "
                         f"= {ratio:.2f}x")
    if out is not None:
        result['same_rows'] = sum(a == b for a, b in zip(out['ours'], out['ref']))
        result['rows'] = len(out['ours'])
        result['summary'] += f", same greedy tokens {result['same_rows']}/{result['rows']} rows"
    return result


def part_decode(report, cfg, done):
    device = current_device()
    s = SIZES[device.type]
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    for preset, keys in (('slice', ['batch_1', 'batch_64', 'grpo_slice']), ('demo', ['grpo_demo'])):
        args = slice_args(device, cfg['layers']) if preset == 'slice' else model_args('demo')
        model = build(args, device, dtype)
        hf = hf_twin(model, device, dtype)
        for key in keys:
            if key.startswith('batch_'):
                rows = int(key[len('batch_'):])
                attempt(report, key, lambda: decode_vs_hf(model, hf, rows, s['decode_prompt'], s['decode_new'],
                                                          s['decode_rounds']))
            else:
                attempt(report, key, lambda: rollout_vs_hf(model, hf, s[key], s['grpo_rounds']))
        del model, hf
        if device.type == 'cuda':
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 6. eval

def pseudo_words(n, seed=0):
    """n distinct lowercase words of two or three syllables: the synthetic task's whole vocabulary."""
    rng = random.Random(seed)
    syllables = [c + v for c in 'bdfgklmnprstvz' for v in 'aeiou']
    words = set()
    while len(words) < n:
        words.add(''.join(rng.choice(syllables) for _ in range(rng.randint(2, 3))))
    return sorted(words)


def piqa_rows(n, words, seed=0):
    """PIQA's schema ({goal, sol1, sol2, label}) and about its lengths, in pseudo-words."""
    rng = random.Random(seed)
    say = lambda lo, hi: ' '.join(rng.choice(words) for _ in range(rng.randint(lo, hi))) + '.'
    return [dict(goal=say(6, 16), sol1=say(6, 24), sol2=say(6, 24), label=rng.randrange(2)) for _ in range(n)]


def write_tokenizer(out_dir, words):
    """A word-level tokenizer.json (+ tokenizer_config.json) over the task's words, adding BOS as Mistral
    does: eval.py (tokenizer.Tokenizer) and transformers both read it, with nothing to download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(['<unk>', '<s>', '</s>', 'Question', 'Answer', ':', '.', *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                       special_tokens=[('<s>', vocab['<s>'])])
    tok.add_special_tokens(['<unk>', '<s>', '</s>'])
    tok.save(os.path.join(out_dir, 'tokenizer.json'))
    with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
        json.dump(dict(tokenizer_class='PreTrainedTokenizerFast', bos_token='<s>', eos_token='</s>',
                       unk_token='<unk>', add_bos_token=True, add_eos_token=False), f)


def run_eval_cli(ckpt, data_dir, device, dtype, tmp):
    """`python eval.py` on the task, as a user runs it -> (its seconds, per question its log-likelihoods)."""
    out_file = os.path.join(tmp, 'eval.json')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'} if device.type == 'cpu' else None  # as current_device()
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--ckpt', ckpt, '--tasks', 'piqa',
                          '--data_dir', data_dir, '--out', out_file, '--log_samples', '--batch_size', '16',
                          '--device', device.type, '--dtype', str(dtype)[6:]], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"eval.py exited {run.returncode}: {(run.stderr.strip().splitlines() or [''])[-1]}")
    with open(out_file) as f:
        result = json.load(f)
    return result['results']['piqa']['seconds'], [item['lls'] for item in result['samples']['piqa']]


def run_hflm(ckpt, rows, device, dtype):
    """lm-evaluation-harness's own piqa task (its YAML) on these rows through HFLM, batch 16 ->
    (seconds of the evaluation, the model already loaded; per question its log-likelihoods)."""
    import datasets
    import lm_eval
    from lm_eval import evaluator
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    datasets.disable_progress_bars()
    quiet_transformers()
    logging.getLogger('lm_eval').setLevel(logging.ERROR)
    lm = HFLM(pretrained=ckpt, device=str(device), dtype=dtype, batch_size=16)
    tables = datasets.DatasetDict(validation=datasets.Dataset.from_list(rows),
                                  train=datasets.Dataset.from_list(rows[:4]))
    config = load_yaml(os.path.join(os.path.dirname(lm_eval.__file__), 'tasks', 'piqa', 'piqa.yaml'),
                       resolve_func=True)
    task = ConfigurableTask(config={**config, 'custom_dataset': lambda **_: tables})
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars and notes
        result = evaluator.simple_evaluate(model=lm, tasks=[task], log_samples=True, bootstrap_iters=0,
                                           verbosity='ERROR', task_manager=TaskManager(include_defaults=False))
    seconds = time.perf_counter() - t0
    samples = sorted(result['samples']['piqa'], key=lambda s: s['doc_id'])
    return seconds, [[r[0] for r in s['filtered_resps']] for s in samples]


def eval_vs_harness(device, cfg, tmp):
    s = SIZES[device.type]
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    args = slice_args(device, cfg['layers'])
    words = pseudo_words(200)
    rows = piqa_rows(s['questions'], words)
    ckpt, data_dir = os.path.join(tmp, 'model'), os.path.join(tmp, 'tasks')
    model = build(args, device, dtype)
    export_hf(model, ckpt, dtype=dtype)
    del model
    write_tokenizer(ckpt, words)
    os.makedirs(os.path.join(data_dir, 'piqa'))
    for split, split_rows in (('validation', rows), ('train', rows[:4])):
        with open(os.path.join(data_dir, 'piqa', f'{split}.jsonl'), 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in split_rows)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    seconds, ours = run_eval_cli(ckpt, data_dir, device, dtype, tmp)
    n = len(rows)
    result = dict(questions=n, shape=describe(args), ours_items_per_s=n / seconds)
    try:
        ref_seconds, ref = run_hflm(ckpt, rows, device, dtype)
    except ImportError as e:
        return skipped(f"lm_eval is not installed ({e.name}); docs/gpu-check.md says how to bring it", **result)
    argmax = lambda xs: max(range(len(xs)), key=lambda i: xs[i])
    same = sum(argmax(a) == argmax(b) for a, b in zip(ours, ref))
    gap = max(abs(x - y) for a, b in zip(ours, ref) for x, y in zip(a, b))
    result.update(lm_eval_items_per_s=n / ref_seconds, ratio=ref_seconds / seconds, same_answers=same, max_ll_diff=gap)
    # bf16 kernels differ between the two, so a near tie may go either way; a bug moves far more
    ok = same >= 0.95 * n
    return dict(status='ok' if ok else 'failed', **result,
                summary=f"{n / seconds:,.1f} vs lm-eval {n / ref_seconds:,.1f} items/s = {ref_seconds / seconds:.2f}x, "
                        f"same answer {same}/{n}, max |ll diff| {gap:.1e}")


def part_eval(report, cfg, done):
    device = current_device()
    with tempfile.TemporaryDirectory() as tmp:
        attempt(report, 'piqa', lambda: eval_vs_harness(device, cfg, tmp))


# ----------------------------------------------------------------------------- running the parts

PARTS = {'correctness': part_correctness, 'kernels': part_kernels, 'train': part_train,
         'memory': part_memory, 'decode': part_decode, 'eval': part_eval}


def write_json(path, obj):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


def _child(fn, path):
    """The forked side of run_part -> its exit code."""
    os.setsid()  # its own process group: a timeout kills what it started too (eval.py, compile workers)
    saved = {'results': {}}

    def report(key, result):
        saved['results'][key] = result
        write_json(path, saved)
    code = 0
    try:
        fn(report)
        if torch.cuda.is_available():  # the machine, for the report: the parent never asks CUDA itself
            memory = torch.cuda.get_device_properties(0).total_memory
            saved['device'] = f"{torch.cuda.get_device_name(0)}, {memory / GIB:.0f} GiB"
        write_json(path, saved)
    except BaseException as e:
        traceback.print_exc()
        saved['error'] = f"{type(e).__name__}: {e}".splitlines()[0]
        write_json(path, saved)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def run_part(fn, limit):
    """fn(report) in a forked child (it inherits the imports; a crash, a hang or an out-of-memory kill
    stays in it), killed with everything it started after `limit` seconds. report(key, result) saves
    each result as it comes, so a part cut short keeps what it had measured.
    -> {status: ok | failed | timeout, seconds, limit_s, results[, error]}"""
    fd, path = tempfile.mkstemp(prefix='gpu_check_', suffix='.json')
    os.close(fd)
    write_json(path, {'results': {}})
    t0 = time.time()
    sys.stdout.flush()  # or the child would print what is still in the buffers a second time
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os._exit(_child(fn, path))
    status, error = None, None
    while status is None:
        finished, code = os.waitpid(pid, os.WNOHANG)
        if finished:
            code = os.waitstatus_to_exitcode(code)
            status = 'ok' if code == 0 else 'failed'
            error = None if code >= 0 else f"killed by signal {-code}"
        elif time.time() - t0 > limit:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # it had not yet made its own group
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status, error = 'timeout', f"stopped at its limit of {limit:g}s"
        else:
            time.sleep(0.05)
    with open(path) as f:
        saved = json.load(f)
    for leftover in (path, path + '.tmp'):  # .tmp: a write the kill cut short
        with contextlib.suppress(FileNotFoundError):
            os.remove(leftover)
    error = saved.get('error', error)
    return dict(status=status, seconds=round(time.time() - t0, 1), limit_s=round(limit, 1), results=saved['results'],
                **{k: v for k, v in (('error', error), ('device', saved.get('device'))) if v})


def complete(part, keys):
    """Every key of the part, those it never reached marked with the part's own fate."""
    fate = {'ok': 'not reported', 'failed': 'not reached (part failed)', 'timeout': 'not reached (part timed out)'}
    for key in keys:
        if key not in part['results']:
            why = part.get('reason') or fate[part['status']]
            part['results'][key] = dict(status=part['status'] if part['status'] != 'ok' else 'failed',
                                        reason=why, summary=why)
    return part


def table(parts_done):
    lines = [f"{'part':<12}{'check':<21}{'status':<9}result", '-' * 100]
    for name, part in parts_done.items():
        if 'seconds' not in part:  # it never ran: one line says why
            lines.append(f"{name:<12}{'(part)':<21}{part['status']:<9}{part['reason']}")
            continue
        for key, r in part['results'].items():
            lines.append(f"{name:<12}{key:<21}{r['status']:<9}{r.get('summary', '')}")
        error = f": {part['error']}" if part.get('error') else ''
        ran = f"{part['seconds']:.0f}s of {part['limit_s']:g}s"
        lines.append(f"{'':<12}{'(part)':<21}{part['status']:<9}{ran}{error}")
    return '\n'.join(lines)


def versions():
    import importlib.metadata as md

    found = {}
    for package in ('torch', 'transformers', 'lm_eval'):
        try:
            found[package] = md.version(package.replace('_', '-'))
        except md.PackageNotFoundError:
            found[package] = 'not installed'
    return found


def main():
    chosen = [p.strip() for p in parts.split(',') if p.strip()]
    unknown = [p for p in chosen + list(limits) if p not in PARTS]
    if unknown or budget_s <= RESERVE_S:
        what = f"unknown part '{unknown[0]}' in --parts or --limits" if unknown else f"budget_s={budget_s} is too small"
        print(f"error: {what} (parts: {', '.join(PARTS)})", file=sys.stderr)
        sys.exit(2)
    t0 = time.time()
    cfg = dict(layers=layers, batch_size=batch_size, steps=steps)
    done = {}
    for name, fn in PARTS.items():
        left = budget_s - RESERVE_S - (time.time() - t0)
        if name not in chosen:
            part = dict(status='skipped', reason='not in --parts', results={})
        elif left < 1:
            part = dict(status='skipped', reason=f'the budget of {budget_s}s is spent', results={})
        else:
            part = run_part(functools.partial(fn, cfg=cfg, done=done), min({**LIMITS, **limits}[name], left))
            print(f"gpu_check: {name} {part['status']} in {part['seconds']:.0f}s", file=sys.stderr, flush=True)
        done[name] = complete(part, KEYS[name])
    device = next((p['device'] for p in done.values() if 'device' in p), 'cpu')
    report = dict(command=' '.join(['python', 'tests/gpu_check.py'] + sys.argv[1:]), device=device,
                  versions=versions(), budget_s=budget_s, seconds=round(time.time() - t0, 1),
                  settings={k: globals()[k] for k in config_keys}, parts=done)
    write_json(out, report)
    print(table(done))
    print(f"\n{device}; {report['seconds']:.0f}s of a {budget_s}s budget; written to {out}")
    bad = [r for p in done.values() for r in p['results'].values() if r['status'] in ('failed', 'timeout')]
    sys.exit(1 if bad else 0)


if __name__ == '__main__':
    from configurator import configure

    configure(globals(), config_keys)
    main()
