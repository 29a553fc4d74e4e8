"""
Speed and memory of this codebase next to the tools people would otherwise pick, in one run:

    python bench.py                                   # everything, on CPU: a few minutes on 2 cores
    python bench.py --only train,decode --device cuda --out bench.json

Settings are the globals below (--key=value, or a config file, as for every script: configurator.py).

    train    tokens/s of one optimizer step (forward, backward, AdamW) and MFU,
             model.py vs transformers' MistralForCausalLM (sdpa attention), same weights and batch
    decode   tokens/s and peak memory of model.generate (what sample.py, eval.py and grpo.py run) vs
             transformers' greedy generate: the demo model with a short prompt and one four windows
             long, SmolLM2-135M's shape (random weights) with a short and a 512-token prompt, the
             tiny model, where a step is all framework overhead, and 8 prompts of different lengths
             in one batch (HF: left-padded) on SmolLM2-135M's shape
    rollout  tokens/s of GRPO's rollouts (grpo.rollout: 8 prompts x 8 samples x 64 tokens in one batch) vs
             transformers' sampling generate with num_return_sequences=8, on SmolLM2-135M's shape
    kvcache  bytes of the rolling-buffer cache vs a full cache: moxin-7b at 32k tokens (computed
             from the cache's own shapes on the meta device) and a small model (allocated and run)
    eval     items/s of eval.py vs lm-evaluation-harness (HFLM, batch 16) on the same model and
             questions: PIQA, HellaSwag, Winogrande 0-shot, MMLU 5-shot and GSM8K 5-shot generation,
             on the demo shape and on SmolLM2-135M's, checking that every answer is the same.
             eval.py runs as a user runs it, a command writing --out JSON, and its own per-task
             `seconds` are what count (they leave out Python's start and the model's loading)
    data     tokenizer tokens/s; MinHash dedup documents/s of data.py vs datasketch

A shared machine speeds up and slows down while this runs, so each comparison times ours and
the reference back to back in the same process, alternating which goes first, over several
rounds. The table shows medians; ours/ref is the median of the per-round ratios, so a slow
moment hits both sides of a round alike. Ratios are ours/ref of the row's unit: above 1 is
better for speed, below 1 is better for memory. Random weights throughout: speed does not
depend on what a model has learnt, and nothing is downloaded.
"""
import contextlib
import ctypes
import dataclasses
import functools
import io
import json
import logging
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import grpo
from configurator import configure, settings
from model import KVCache, Sampling, Transformer, generate, model_args
from trainer import datasheet_peak, flops_per_token
from weights import export_hf

# ----------------------------------------------------------------------------- settings
only = "train,decode,rollout,kvcache,eval,data"  # comma-separated sections (see above)
device = "cpu"  # or cuda
out = ""  # also write the rows and the machine to this JSON file
eval_shapes = "demo,smollm2-135m"  # the eval section's model shapes
eval_tasks = "piqa,hellaswag,winogrande,mmlu,gsm8k"  # and its tasks
config_keys = settings(globals())


# ----------------------------------------------------------------------------- measuring

def race(contenders, rounds, sync, self_timed=()):
    """Time each callable once per round, the order reversed every other round -> {name: [seconds]}.
    The contenders named in self_timed return the seconds to count themselves (eval.py run as
    a command reports its task's time, without Python's start and the model's loading)."""
    times = {name: [] for name in contenders}
    order = list(contenders.items())
    for r in range(rounds):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            sync()
            t0 = time.perf_counter()
            seconds = fn()
            sync()
            times[name].append(seconds if name in self_timed else time.perf_counter() - t0)
    return times


def speedup(ours, ref):
    """Median over rounds of ref time / our time: how many times faster ours is."""
    return statistics.median(r / o for o, r in zip(ours, ref))


def peak_memory(fn, device):
    """Bytes a call needs on top of what is already held. CUDA: the allocator's peak. CPU: the
    peak resident set size (VmHWM, whose high-water mark /proc/self/clear_refs resets) minus
    the resident set before; malloc_trim first, so that heap freed by an earlier call goes back
    to the system instead of being reused unseen. None where /proc is not Linux's."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _proc_status_kb("VmRSS")
    fn()
    return (_proc_status_kb("VmHWM") - before) * 1024


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def row(section, what, ours, ref, ratio=None, unit="", note=""):
    if ratio is None and ours is not None and ref:
        ratio = ours / ref
    return dict(section=section, what=what, ours=ours, ref=ref, ratio=ratio, unit=unit, note=note)


# ----------------------------------------------------------------------------- models

def build(args, device, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    return model


def hf_twin(model, device):
    """transformers' MistralForCausalLM holding our weights, through export_hf and
    from_pretrained: the way a user of both would move a model across."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp, dtype=torch.float32)
        hf = transformers.MistralForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=torch.float32)
    return hf.to(device)


def gpu_peak():
    return datasheet_peak(torch.cuda.get_device_name())


# ----------------------------------------------------------------------------- train

def bench_train(device, sync):
    cuda = device.type == "cuda"
    if cuda:  # the GPU target: a ~1B-parameter Mistral shape at 4k context, bf16 autocast
        args = model_args("moxin-7b", dim=2048, n_layers=18, hidden_dim=7168, n_heads=16, n_kv_heads=4,
                          max_seq_len=4096)
        batch, seq_len, rounds = 1, 4096, 10
    else:  # the demo config, the model a CPU user trains; T = W so attention is plain causal
        args = model_args("demo")
        batch, seq_len, rounds = 4, 256, 10
    model = build(args, device).train()
    hf = hf_twin(model, device).train()
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def stepper(net, loss_fn):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)

        def step():
            with autocast:
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    ours = stepper(model, lambda: model(x, y)[1])
    # shift_labels: the targets as given, so HF scores the same B*T predictions ours does
    ref = stepper(hf, lambda: hf(input_ids=x, labels=y, shift_labels=y).loss)
    losses = (ours(), ref())  # same weights, same batch: the same loss, or this compares two different things
    for _ in range(2):  # optimizer state, allocator and page faults settle in the first steps
        ours(), ref()

    contenders = {"ours": ours, "ref": ref}
    if not cuda:  # CPU: this core's float32 matmul peak, measured in every round beside the two
        n, reps = 1024, 8
        a, b = torch.randn(n, n), torch.randn(n, n)
        contenders["peak"] = lambda: [a @ b for _ in range(reps)]
    times = race(contenders, rounds, sync)
    flops = flops_per_token(model.args, seq_len) * batch * seq_len
    if cuda:
        peak = gpu_peak()
        peaks = [peak] * rounds
        peak_note = (f"{torch.cuda.get_device_name()} dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak
                     else f"no datasheet peak known for {torch.cuda.get_device_name()}")
    else:
        peaks = [reps * 2 * n ** 3 / t for t in times["peak"]]
        peak_note = f"float32 matmul peak measured each round, median {statistics.median(peaks) / 1e9:.0f} GFLOP/s"
    mfu = {k: statistics.median(flops / t / p for t, p in zip(times[k], peaks)) if peaks[0] else None
           for k in ("ours", "ref")}
    shape = f"{model.num_params() / 1e6:.0f}M params, {batch}x{seq_len} tokens, {'bf16 autocast' if cuda else 'float32'}"
    return [
        row("train", f"tokens/s, fwd+bwd+AdamW ({shape})",
            batch * seq_len / statistics.median(times["ours"]), batch * seq_len / statistics.median(times["ref"]),
            speedup(times["ours"], times["ref"]), note=f"first-step loss {losses[0]:.4f} vs {losses[1]:.4f}"),
        row("train", "MFU", mfu["ours"], mfu["ref"], unit="%", note=peak_note),
    ]


# ----------------------------------------------------------------------------- decode

def bench_decode(device, sync):
    """demo: a step reads the tied 32000 x 256 output head, most of its weights, so it is
    memory-bound; smollm2-135m: a real model's shape, where the 30 blocks are most of a step;
    tiny: so small that a step is all framework overhead. Then a batch of prompts of different
    lengths, ours batched against HF's batched generate on left-padded prompts."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = [40, 75, 110, 150, 190, 230, 270, 310]
    cases = {"demo": ([[16], [1024]], 5), "tiny": ([[32]], 5), "smollm2-135m": ([[16], [512], batch], 3)}
    rows = []
    for preset, (prompt_lengths, rounds) in cases.items():
        args = model_args(preset, max_seq_len=4096)  # above prompt + new; a window itself sets no limit
        model = build(args, device).to(dtype).eval()
        hf = hf_twin(model, device).to(dtype).eval()
        hf.generation_config.eos_token_id = None  # always all the new tokens, as ours with eos_id=None
        for lengths in prompt_lengths:
            W = args.sliding_window
            what = f"{preset}, prompt {lengths[0]}" + (f" = {lengths[0] // W}W" if W and lengths[0] >= W else "")
            if len(lengths) > 1:
                what = f"{preset}, batch of {len(lengths)}, prompts {min(lengths)}-{max(lengths)}"
            rows += decode_rows(model, hf, lengths, 64, rounds, what, device, sync)
    return rows


def decode_rows(model, hf, lengths, new, rounds, what, device, sync):
    """Tokens/s and memory of generate for prompts of these lengths vs HF generate (batched on
    left-padded prompts, the way HF batches prompts of different lengths)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    pad_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = {}

    def ours():
        out["ours"] = generate(model, prompts, new)

    def ref():
        result = hf.generate(ids, attention_mask=pad_mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
        out["ref"], out["ref_cache"] = result.sequences[:, width:].tolist(), result.past_key_values

    ours(), ref()
    same = sum(a == b for a, b in zip(out["ours"], out["ref"]))
    times = race({"ours": ours, "ref": ref}, rounds, sync)
    memory = {"ours": peak_memory(ours, device), "ref": peak_memory(ref, device)}
    # what each holds at the end; ours sizes its buffer to min(prompt + new tokens, W) per row
    ours_cache = len(prompts) * KVCache(model.args, 1, "meta", next(model.parameters()).dtype,
                                        max_tokens=width + new).nbytes()
    ref_cache = sum(t.nbytes for layer in out["ref_cache"].layers for t in (layer.keys, layer.values))
    what += f" + {new} tokens"
    tokens = new * len(prompts)
    return [
        row("decode", f"tokens/s, {what}", tokens / statistics.median(times["ours"]),
            tokens / statistics.median(times["ref"]), speedup(times["ours"], times["ref"]),
            note=f"same greedy tokens in {same}/{len(prompts)} rows" if len(prompts) > 1
            else "same greedy tokens" if same else "greedy tokens DIFFER"),
        row("decode", f"peak memory, {what}", memory["ours"], memory["ref"], unit="bytes",
            note="CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS growth during the call"),
        row("decode", f"KV cache at the end, {what}", ours_cache, ref_cache, unit="bytes"),
    ]


def bench_rollout(device, sync):
    """GRPO's rollouts: 8 prompts of different lengths x 8 sampled completions x 64 new tokens on
    SmolLM2-135M's shape, through grpo.rollout (all 64 rows in one batch), against HF's sampling
    generate with num_return_sequences=8 on the left-padded prompts. Sampled: the tokens differ."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(model_args("smollm2-135m", max_seq_len=4096), device).to(dtype).eval()
    hf = hf_twin(model, device).to(dtype).eval()
    hf.generation_config.eos_token_id = None  # every completion all 64 tokens, as ours with eos_id=None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist() for n in range(40, 120, 10)]
    width, new, n = max(map(len, prompts)), 64, 8
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    pad_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def ours():
        generators = [grpo.group_generators(0, 0, slot, n, device) for slot in range(len(prompts))]
        grpo.rollout(model, prompts, generators, new, Sampling(1.0), None, chunk_rows=len(prompts) * n)

    def ref():
        hf.generate(ids, attention_mask=pad_mask, max_new_tokens=new, do_sample=True, temperature=1.0, top_k=0,
                    top_p=1.0, num_return_sequences=n, pad_token_id=0)

    ours(), ref()
    times = race({"ours": ours, "ref": ref}, 3, sync)
    tokens = len(prompts) * n * new
    return [row("rollout", f"tokens/s, smollm2-135m, {len(prompts)} prompts (40-110) x {n} samples + {new} tokens",
                tokens / statistics.median(times["ours"]), tokens / statistics.median(times["ref"]),
                speedup(times["ours"], times["ref"]), note="sampled at temperature 1: the tokens differ")]


# ----------------------------------------------------------------------------- kvcache

def kvcache_rows(device, small="demo", L_small=2048):
    """Rolling buffer vs full cache. The ratio is W/L by construction; the measured half also
    runs a prompt through both caches and checks the last hidden state is the same."""
    rows = []
    big = model_args("moxin-7b")
    L = 32768
    # the shapes KVCache really allocates, on the meta device: no memory is touched
    rolling = KVCache(big, 1, "meta", torch.bfloat16).nbytes()
    full = KVCache(dataclasses.replace(big, sliding_window=None, max_seq_len=L), 1, "meta", torch.bfloat16).nbytes()
    rows.append(row("kvcache", f"bytes at {L} tokens, moxin-7b, bf16 (computed)", rolling, full, unit="bytes",
                    note=f"W/L = {big.sliding_window}/{L} = {big.sliding_window / L:g}"))

    args = model_args(small)
    model = build(args, device).eval()
    idx = torch.randint(0, args.vocab_size, (1, L_small), generator=torch.Generator().manual_seed(0)).to(device)
    rolling = KVCache(args, 1, device, torch.float32)
    full = KVCache(dataclasses.replace(args, sliding_window=None, max_seq_len=L_small), 1, device, torch.float32)
    with torch.no_grad():
        same = torch.allclose(model.hidden(idx, rolling)[:, -1], model.hidden(idx, full)[:, -1], atol=1e-4)
    rows.append(row("kvcache", f"bytes at {L_small} tokens, {small} preset, float32 (allocated)",
                    rolling.nbytes(), full.nbytes(), unit="bytes",
                    note=f"W/L = {args.sliding_window}/{L_small} = {args.sliding_window / L_small:g}; "
                         + ("same last hidden state" if same else "last hidden state DIFFERS")))
    return rows


def bench_kvcache(device, sync):
    return kvcache_rows(device)


# ----------------------------------------------------------------------------- eval

MMLU_BENCH_SUBJECTS = ("college_physics", "high_school_world_history")


def doc_sentences():
    """Sentences of Python's own documentation: real English of realistic length, offline."""
    from pydoc_data.topics import topics

    pieces = (s.strip() for text in topics.values() for s in re.split(r"(?<=[.?!])\s+", text))
    return sorted({s for s in pieces if 40 <= len(s) <= 200 and "\n" not in s})


def synthetic_tasks(n_zero_shot, n_per_subject, n_gsm8k, seed=0):
    """{task: {split: rows}} in the HF schemas of piqa, hellaswag, winogrande, mmlu and gsm8k, made of
    doc sentences: the questions need not make sense for a random-weight model to be timed on them."""
    rng = random.Random(seed)
    sentences = doc_sentences()
    say = lambda lo=4, hi=30: " ".join(rng.choice(sentences).split()[:rng.randint(lo, hi)])
    piqa = lambda n: [dict(goal=say(3, 20), sol1=say(5, 30), sol2=say(5, 30), label=rng.randrange(2)) for _ in range(n)]
    hellaswag = lambda n: [dict(activity_label=say(1, 3), ctx_a=say(), ctx_b=say(2, 5).lower(),
                                endings=[say(5, 20) for _ in range(4)], label=str(rng.randrange(4))) for _ in range(n)]
    mmlu = lambda n, subject: [dict(question=say(20, 60) + " " + say(), subject=subject,
                                    choices=[say(1, 8) for _ in range(4)], answer=rng.randrange(4)) for _ in range(n)]
    # a blank somewhere in the sentence: the two choices differ from there on
    winogrande = lambda n: [dict(sentence=say(3, 20) + " _ " + say(3, 15), option1=say(1, 3), option2=say(1, 3),
                                 answer=str(rng.randint(1, 2))) for _ in range(n)]
    # a worked solution of GSM8K's length (~100 words), ending as GSM8K's do
    gsm8k = lambda n: [dict(question=say(20, 50) + "?", answer=f"{say(40, 60)}\n{say(40, 60)}\n#### {rng.randrange(1000)}")
                       for _ in range(n)]
    return {"piqa": {"validation": piqa(n_zero_shot), "train": piqa(4)},
            "hellaswag": {"validation": hellaswag(n_zero_shot), "train": hellaswag(4)},
            "winogrande": {"validation": winogrande(n_zero_shot), "train": winogrande(4)},
            "mmlu": {"test": [r for s in MMLU_BENCH_SUBJECTS for r in mmlu(n_per_subject, s)],
                     "dev": [r for s in MMLU_BENCH_SUBJECTS for r in mmlu(5, s)]},
            "gsm8k": {"test": gsm8k(n_gsm8k), "train": gsm8k(8)}}


def hf_tokenizer(out_dir):
    """transformers' tokenizer for Mistral's SentencePiece model (as tokenizer.Tokenizer.save_hf
    exports it), saved into out_dir with a tokenizer.json. tokenizer.Tokenizer prefers that file,
    so eval.py and the harness split text the same way: transformers' conversion splits some
    runs of spaces unlike SentencePiece itself."""
    import transformers

    from tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as spm_dir:
        Tokenizer.load("mistral").save_hf(spm_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(spm_dir)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def harness_tasks(splits_by_task, shots, max_gen_toks=None):
    """lm-evaluation-harness's own task configs (YAML), documents served from our rows; a generative
    task's max_gen_toks set in its generation_kwargs, where the harness reads it."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    tasks = []
    for task, splits in splits_by_task.items():
        per_unit = {f"{task}/default.yaml" if task == "winogrande" else f"{task}/{task}.yaml": splits} \
            if task != "mmlu" else {
            f"mmlu/default/mmlu_{s}.yaml": {name: [r for r in rows if r["subject"] == s] for name, rows in splits.items()}
            for s in MMLU_BENCH_SUBJECTS}
        for yaml, rows in per_unit.items():
            tables = datasets.DatasetDict({name: datasets.Dataset.from_list(r) for name, r in rows.items()})
            config = load_yaml(os.path.join(yaml_dir, yaml), resolve_func=True)
            if "generation_kwargs" in config and max_gen_toks:
                config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": max_gen_toks}
            tasks.append(ConfigurableTask(config={**config, "custom_dataset": lambda tables=tables, **_: tables,
                                                  "num_fewshot": shots}))
    return tasks


@dataclasses.dataclass
class EvalShape:
    name: str
    args: object
    sizes: tuple  # questions: per zero-shot task, per MMLU subject, of gsm8k
    max_gen_toks: int  # gsm8k's generation limit
    rounds: int


# Questions per task: enough that both sides batch requests of similar lengths, as on a real
# task's thousands (with a handful, every batch pads a lot), and 16 per MMLU subject: a real
# subject has 100-1,534 test questions sharing its 5-shot prefix, so 16 understates that saving.
# SmolLM2-135M's shape is a real small model, where the 30 layers and not the output head cost
# most (the demo model's 32000 x 256 head flatters any saving on the head); it costs ~15x the
# demo's work per token, so it gets fewer rounds.
EVAL_SHAPES = {"demo": EvalShape("demo", model_args("demo"), (64, 16, 8), 64, 3),
               "smollm2-135m": EvalShape("smollm2-135m shape", model_args("smollm2-135m", max_seq_len=2048),
                                         (64, 16, 8), 32, 2)}
EVAL_RUNS = [("piqa", 0), ("hellaswag", 0), ("winogrande", 0), ("mmlu", 5), ("gsm8k", 5)]


def bench_eval(device, sync, shapes=tuple(EVAL_SHAPES), tasks=tuple(task for task, _ in EVAL_RUNS)):
    return [r for name in shapes for r in bench_eval_shape(device, sync, EVAL_SHAPES[name], tasks)]


def bench_eval_shape(device, sync, shape, tasks, batch_size=16):
    """eval.py vs the harness's HFLM on one model shape (random weights, float32 on every device:
    identical answers are part of the claim, and bf16 kernels differ), each task timed in rounds."""
    from lm_eval.models.huggingface import HFLM

    model = build(shape.args, device).eval()
    all_splits = synthetic_tasks(*shape.sizes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data_dir = os.path.join(tmp, "model"), os.path.join(tmp, "tasks")
        export_hf(model, model_dir, dtype=torch.float32)
        hf_tokenizer(model_dir)
        for task, splits in all_splits.items():
            os.makedirs(os.path.join(data_dir, task))
            for split, split_rows in splits.items():
                with open(os.path.join(data_dir, task, f"{split}.jsonl"), "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in split_rows)
        lm = HFLM(pretrained=model_dir, device=str(device), dtype=torch.float32, batch_size=batch_size)
        for task, shots in [(task, shots) for task, shots in EVAL_RUNS if task in tasks]:
            command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval.py"),
                       "--ckpt", model_dir, "--tasks", task, "--num_fewshot", str(shots), "--data_dir", data_dir,
                       "--batch_size", str(batch_size), "--max_gen_toks", str(shape.max_gen_toks),
                       "--device", str(device), "--dtype", "float32", "--log_samples"]
            ours = lambda: run_eval_py(command, os.path.join(tmp, "out.json"), task)
            ref = lambda: harness_samples(lm, harness_tasks({task: all_splits[task]}, shots, shape.max_gen_toks))
            rows.append(eval_row(task, shots, shape, ours, ref, sync))
    return rows


def run_eval_py(command, out_file, task):
    """Run eval.py's command line writing out_file -> (its items of task, its seconds for the task)."""
    done = subprocess.run(command + ["--out", out_file], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"eval.py failed: {done.stderr.strip().splitlines()[-1:]}")
    with open(out_file) as f:
        written = json.load(f)
    return written["samples"][task], written["results"][task]["seconds"]


def harness_samples(lm, tasks):
    """Per question the harness's log-likelihoods of its choices or, for gsm8k, its generated text
    and {filter: answer}, in the order eval.py returns its items."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        result = evaluator.simple_evaluate(model=lm, tasks=tasks, log_samples=True, verbosity="ERROR",
                                           task_manager=TaskManager(include_defaults=False))
    out = []
    for t in tasks:
        by_doc = {}
        for s in sorted(result["samples"][t.config.task], key=lambda s: s["doc_id"]):
            if t.config.output_type == "generate_until":  # one sample per filter
                by_doc.setdefault(s["doc_id"], (s["resps"][0][0], {}))[1][s["filter"]] = s["filtered_resps"][0]
            else:
                by_doc[s["doc_id"]] = [r[0] for r in s["filtered_resps"]]
        out += by_doc.values()
    return out


def eval_row(task, shots, shape, ours, ref, sync):
    """ours() -> (items, seconds), eval.py's; ref() -> the harness's samples, timed here."""
    out = {"ref": ref()}  # untimed: a first call pays for allocations and kernel setup (eval.py's own
    # process pays them inside its time, each round: the comparison leans, if anywhere, against it)

    def run_ours():
        out["ours"], seconds = ours()
        return seconds

    times = race({"ours": run_ours, "ref": lambda: out.update(ref=ref())}, shape.rounds, sync, self_timed=("ours",))
    n = len(out["ours"])
    if task == "gsm8k":
        same = sum(o["completions"][0]["text"] == text and o["completions"][0]["extracted"] == answers
                   for o, (text, answers) in zip(out["ours"], out["ref"]))
        what, note = f"{task} {shots}-shot generation, {shape.max_gen_toks} new tokens", f"same text and answers {same}/{n}"
    else:
        # the harness's answer: the first of its largest log-likelihoods
        same = sum(o["pred"] == max(range(len(r)), key=r.__getitem__) for o, r in zip(out["ours"], out["ref"]))
        gap = max(abs(a - b) for o, r in zip(out["ours"], out["ref"]) for a, b in zip(o["lls"], r))
        what, note = f"{task} {shots}-shot", f"same answer {same}/{n}, max |log-lik diff| {gap:.1e}"
    return row("eval", f"items/s, {what} ({n} questions), {shape.name}", n / statistics.median(times["ours"]),
               n / statistics.median(times["ref"]), speedup(times["ours"], times["ref"]), note=note)


# ----------------------------------------------------------------------------- data

def corpus(n_stdlib=300, n_near_copies=100, seed=0):
    """Python's docs and standard library (offline; prose and code), plus planted near
    copies: one word in 400 replaced, so each copy keeps a Jaccard similarity well above 0.8."""
    import sysconfig
    from pydoc_data.topics import topics

    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) if "site-packages" not in d and "test" not in d
                   for f in fs if f.endswith(".py"))
    docs = [topics[k] for k in sorted(topics)]
    for path in files[:n_stdlib]:
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append(f.read())
    rng = random.Random(seed)
    for original in rng.sample(docs, n_near_copies):
        words = original.split(" ")
        for i in rng.sample(range(len(words)), max(1, len(words) // 400)):
            words[i] = "edited"
        docs.append(" ".join(words))
    return docs, n_near_copies


def bench_data(device, sync):
    import datasketch

    from data import Dedup, MinHash, lsh_bands
    from tokenizer import Tokenizer

    docs, planted = corpus()
    rounds, rows = 3, []

    # tokenize: Mistral's tokenizer, the default of data.py, one document at a time as its workers
    # do; transformers' fast tokenizer of the same model gets the whole list (its fastest path)
    ours_tok = Tokenizer.load("mistral")
    with tempfile.TemporaryDirectory() as tmp:
        ref_tok = hf_tokenizer(tmp)
    out = {}

    def ours():
        out["ours"] = [ours_tok.encode(d) for d in docs]

    def ref():
        out["ref"] = ref_tok(docs, add_special_tokens=False)["input_ids"]

    times = race({"ours": ours, "ref": ref}, rounds, sync)
    n_tokens = sum(map(len, out["ours"]))
    same = sum(a == b for a, b in zip(out["ours"], out["ref"]))
    same_text = sum(ours_tok.decode(a) == ours_tok.decode(b) for a, b in zip(out["ours"], out["ref"]))
    rows.append(row("data", f"tokens/s, tokenize {len(docs)} documents ({n_tokens / 1e6:.1f}M tokens)",
                    n_tokens / statistics.median(times["ours"]), n_tokens / statistics.median(times["ref"]),
                    speedup(times["ours"], times["ref"]),
                    note=f"same ids {same}/{len(docs)}, same text {same_text}/{len(docs)} documents"))

    # near-dedup at Jaccard 0.8 of word 13-grams, 128 permutations: datasketch's MinHashLSH
    # chooses 9 bands of 13 rows for that, and lsh_bands the same
    num_perm, ngram = 128, 13
    minhash = MinHash(num_perm, lsh_bands(0.8, num_perm), ngram)

    def ours():
        dedup = Dedup(minhash.bands)
        # the digest is the exact-dup check's key; every document is distinct, so its index serves
        out["ours"] = sum(dedup.check(i, minhash.band_keys(minhash.signature(d))) is not None
                          for i, d in enumerate(docs))

    def ref():
        lsh, found = datasketch.MinHashLSH(threshold=0.8, num_perm=num_perm), 0
        for i, d in enumerate(docs):
            words = re.findall(r"\w+", d.lower())
            m = datasketch.MinHash(num_perm=num_perm)
            m.update_batch({" ".join(words[j:j + ngram]).encode() for j in range(max(1, len(words) - ngram + 1))})
            if lsh.query(m):
                found += 1
            else:
                lsh.insert(i, m)
        out["ref"] = found

    times = race({"ours": ours, "ref": ref}, rounds, sync)
    rows.append(row("data", f"documents/s, MinHash-LSH near-dedup ({len(docs)} documents, {num_perm} perms)",
                    len(docs) / statistics.median(times["ours"]), len(docs) / statistics.median(times["ref"]),
                    speedup(times["ours"], times["ref"]),
                    note=f"near duplicates found {out['ours']} vs {out['ref']} ({planted} planted)"))
    return rows


# ----------------------------------------------------------------------------- report

SECTIONS = {"train": bench_train, "decode": bench_decode, "rollout": bench_rollout, "kvcache": bench_kvcache,
            "eval": bench_eval, "data": bench_data}
REFERENCES = {
    "train": "transformers {transformers} MistralForCausalLM, attn_implementation='sdpa', same weights",
    "decode": "transformers {transformers} generate(do_sample=False), its DynamicCache (sliding-window layers)",
    "rollout": "transformers {transformers} generate(do_sample=True, num_return_sequences=8), left-padded prompts",
    "kvcache": "a full cache holding every position",
    "eval": "lm-evaluation-harness {lm_eval} HFLM on the same weights, tokenizer and questions",
    "data": "tokenize: transformers' fast tokenizer of the same model; dedup: datasketch {datasketch}",
}


def fmt(value, unit):
    if value is None:
        return "n/a"
    if unit == "bytes":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value:.0f} B"
    if unit == "%":
        return f"{100 * value:.1f}%"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def versions():
    import importlib.metadata as md

    out = {}
    for package in ("torch", "transformers", "lm_eval", "datasketch"):
        try:
            out[package] = md.version(package.replace("_", "-"))
        except md.PackageNotFoundError:
            out[package] = "not installed"
    return out


def machine(device):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    desc = f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name()}; host {desc}"
    return desc


def quiet_third_parties():
    """Progress bars and advice from transformers, datasets and lm_eval would bury the table."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def table(rows):
    header = ("section", "measurement", "ours", "reference", "ours/ref", "")
    lines = [(r["section"], r["what"], fmt(r["ours"], r["unit"]), fmt(r["ref"], r["unit"]),
              "" if r["ratio"] is None else f"{r['ratio']:.3g}", r["note"]) for r in rows]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(5)]
    render = lambda line: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) \
        + ("  " + line[5] if line[5] else "")
    return "\n".join([render(header), "  ".join("-" * w for w in widths)] + [render(line) for line in lines])


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    config = {k: globals()[k] for k in config_keys}  # a copy: main may run more than once in a process (tests)
    configure(config, config_keys, argv)
    sections = config["only"].split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    shapes, tasks = config["eval_shapes"].split(","), config["eval_tasks"].split(",")
    unknown += [f"eval_shapes {s}" for s in shapes if s not in EVAL_SHAPES]
    unknown += [f"eval_tasks {t}" for t in tasks if t not in dict(EVAL_RUNS)]
    if unknown:
        fail(f"unknown {', '.join(unknown)} (sections: {', '.join(SECTIONS)}; eval_shapes: {', '.join(EVAL_SHAPES)}; "
             f"eval_tasks: {', '.join(dict(EVAL_RUNS))})")
    if config["device"] not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda, got {config['device']}")
    if config["device"] == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but torch sees no GPU")
    device = torch.device(config["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    quiet_third_parties()
    info = dict(machine=machine(device), versions=versions(), load_before=os.getloadavg())
    print(f"{info['machine']}; load average {info['load_before'][0]:.2f}", file=sys.stderr)
    rows = []
    t0 = time.time()
    try:
        for section in sections:
            start = time.time()
            run = functools.partial(bench_eval, shapes=shapes, tasks=tasks) if section == "eval" else SECTIONS[section]
            rows += run(device, sync)
            print(f"{section} done in {time.time() - start:.0f}s", file=sys.stderr)
    finally:  # a failing section still shows what the others measured
        print(table(rows))
    info.update(seconds=round(time.time() - t0), load_after=os.getloadavg())
    print(f"\nmachine: {info['machine']}; {info['seconds']}s; load average {info['load_before'][0]:.2f} "
          f"before, {info['load_after'][0]:.2f} after")
    for section in dict.fromkeys(r["section"] for r in rows):
        print(f"reference, {section}: {REFERENCES[section].format(**info['versions'])}")
    if config["out"]:
        with open(config["out"], "w") as f:
            json.dump({**info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
