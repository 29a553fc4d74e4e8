"""
Benchmarks defined and scored the way lm-evaluation-harness 0.4 does it, so the numbers
agree with it item by item:

  log-likelihood multiple choice: ARC-Easy/Challenge, HellaSwag, PIQA, Winogrande, MMLU
  generation: GSM8K (the harness's gsm8k task) and MATH-500 (DeepScaleR's prompt, a
  \\boxed{} answer graded by tasks/math_grader.py, whose math_reward is grpo.py's reward)

    python eval.py --ckpt out/final.pt --suite moxin_zeroshot
    python eval.py --ckpt path/to/hf_model --tasks mmlu --num_fewshot 5 --out mmlu.json
    python eval.py --ckpt path/to/hf_model --tasks gsm8k --out gsm8k.json --log_samples
    python eval.py --ckpt path/to/reasoning_model --tasks math500 --chat --samples 16 --temperature 0.6
    torchrun --nproc_per_node=8 eval.py --ckpt path/to/reasoning_model --tasks math500 --chat --samples 16 --temperature 0.6

Settings are the globals below, set by a config file and --key=value (or --key value, or a
bare --flag) as for every script (configurator.py). Data comes from the Hugging Face hub (the
harness's dataset paths and splits), or from --data_dir DIR with DIR/<task>/<split>.jsonl in
the dataset's own schema (tasks/ defines each task: prompts, shots, graders).

Multiple choice: a question becomes one (context, continuation) pair per choice. The
model's log-likelihood of each continuation given its context picks the answer: acc
takes the largest, acc_norm divides each by the choice's length in characters first, so
long answers are not penalised for being long. score_reference computes it plainly, one
forward pass per pair; score_cached, which evaluate_choices uses, gets the same numbers sharing the
work through the KV cache (see its docstring; a test holds the two equal).

Generation: the prompt is encoded as the harness's HF backend encodes it, the model
writes until EOS, a stop string or the generation limit, and the text is cut before the
first stop string; each task's grader turns the text into an answer and a verdict.
Completion j of problem i draws from its own generator, seeded by (seed, i, j) alone, so neither
the batches nor the ranks change a completion. Under torchrun every rank loads the whole model
and scores every world_size-th question (my_share); the shares are merged in dataset order, and
rank 0 prints and writes the one result, the single process's.
"""
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from os.path import commonprefix
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from configurator import configure, settings
from model import KVCache, Sampling, apply_rope, attend, generate, rope_cos_sin, seeded_generator, window_mask
from tokenizer import Tokenizer, encode_chat
from weights import load_model

# ----------------------------------------------------------------------------- settings
ckpt = ""  # a .pt checkpoint of this project, an HF model directory or hub id (required)
tasks = ""  # comma-separated task names, from tasks.TASKS; or instead:
suite = ""  # one of Moxin's reported suites (tasks.SUITES), each task with its own shots
num_fewshot = None  # shots for every task of `tasks` (None: each task's own, as the harness: gsm8k 5, the others 0)
limit = None  # only the first N questions of each task (MMLU: of each subject)
batch_size = 16  # most sequences (KV-cache rows) in one forward pass; memory grows with it
data_dir = ""  # read DIR/<task>/<split>.jsonl (HF schema) instead of the HF hub
out = ""  # write all metrics to this JSON file
log_samples = False  # also write every item to `out`: prompt, completions, extracted answers, gold, verdict
chat = False  # generative tasks: each prompt as the user's turn of the chat template, the assistant's turn opened
max_gen_toks = None  # generation limit (None: the task's own: gsm8k 256, math500 4096)
samples = 1  # completions per problem; the score is their mean
temperature = 0.0  # 0: greedy
top_p = 1.0
seed = 0  # of the sampling
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "auto"  # float32 on CPU (no fast bf16 there), bfloat16 on CUDA
config_keys = settings(globals())
# ----------------------------------------------------------------------------- (imported after the
# settings, so that the table SUITES is not taken for one)
from tasks import SUITES, fewshot_prefix, get_task, load_units, prompt_pairs  # noqa: E402


class EvalError(ValueError):
    """Bad input; the command line prints it as one line."""


def encode_pair(tokenizer, context, continuation, max_len):
    """(inputs, targets) exactly as the harness's HF backend builds them: whitespace at
    the end of the context moves to the continuation; the continuation's tokens are
    those of the whole text past the context's own tokens, with the tokenizer's default
    special tokens (BOS for Mistral); sequences longer than the model's context are cut
    from the left. The last len(targets) inputs are the positions that predict targets."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = tokenizer.encode(context, add_special_tokens=True)
    targets = tokenizer.encode(context + continuation, add_special_tokens=True)[len(context_ids):]
    if len(targets) > max_len:
        raise EvalError(f"a continuation of {len(targets)} tokens exceeds the model's context of {max_len}")
    inputs = (context_ids + targets)[-(max_len + 1):-1]
    return inputs, targets


# ----------------------------------------------------------------------------- scoring
#
# A request is (inputs, targets): the targets' log-likelihood is read at the last
# len(targets) input positions. score_reference does exactly that, one forward pass per
# request. score_cached gets the same numbers with far less work; it is tested against it.

@torch.no_grad()
def score_reference(model, requests):
    """Log-likelihood of each request's targets, one plain forward pass over its own inputs."""
    device = model.tok_embeddings.weight.device
    lls = []
    for inputs, targets in requests:
        logits, _ = model(torch.tensor([inputs], device=device))
        logprobs = F.log_softmax(logits[0, -len(targets):], dim=-1)
        lls.append(logprobs.gather(1, torch.tensor(targets, device=device)[:, None]).sum().item())
    return lls


@torch.no_grad()
def score_cached(model, questions, batch_size, progress):
    """Log-likelihood of every request, as score_reference gives it; questions: per question
    a list of requests (inputs, targets); progress: a tqdm bar, advanced per question.

    The work is shared at three levels, and every scored position still reads exactly the
    tokens, at the same positions, that its own forward pass would:
      1. the `shared` tokens that begin every request of a subtask (MMLU: a subject's header
         and shots)
         are prefilled once into a one-row cache;
      2. the requests of a question agree up to its context's end; a batch of questions runs
         their contexts as one forward pass from that cache, a row each;
      3. each context row is then copied once per request (KVCache.select) and the rest of
         every request, its tail past the context, runs as one batch.
    Rows of different lengths go through ragged_hidden, which spends no work on padding. A
    question whose requests all end with its context (MMLU: the answer is one letter,
    predicted from the context's last position) has no tails. Logits (a dim x vocab matmul
    per token) are computed only at the scored positions. Questions go in the harness's
    order, longest request first."""
    weight = model.tok_embeddings.weight
    requests = [r for q in questions for r in q]
    # stop before the first scored position: the shared tokens' hidden states are never read
    first_scored = min(len(inputs) - len(targets) for inputs, targets in requests)
    shared = min(len(commonprefix([inputs for inputs, _ in requests])), first_scored)
    # a cache that holds whole requests and never rolls (the model's window is kept by the
    # mask), so that every row's tokens go in as one piece
    longest = max(len(inputs) for inputs, _ in requests)
    base = KVCache(replace(model.args, sliding_window=None, max_seq_len=longest), 1, weight.device, weight.dtype)
    if shared:
        model.hidden(torch.tensor([requests[0][0][:shared]], device=weight.device), base)

    ends = [len(commonprefix([inputs for inputs, _ in q])) for q in questions]
    # cache rows a question needs: its context's, then one per request that goes past it
    rows = [max(1, sum(len(inputs) > end for inputs, _ in q)) for q, end in zip(questions, ends)]
    order = sorted(range(len(questions)), key=lambda i: max(len(r[0]) for r in questions[i]), reverse=True)
    scores = [None] * len(questions)
    while order:
        batch = [order.pop(0)]  # the first question always fits
        while order and sum(rows[i] for i in batch + order[:1]) <= batch_size:
            batch.append(order.pop(0))
        for i, lls in zip(batch, score_cached_batch(model, base, shared, [ends[i] for i in batch],
                                                    [questions[i] for i in batch])):
            scores[i] = lls
        progress.update(len(batch))
    return scores


def score_cached_batch(model, base, shared, ends, questions):
    """Score questions whose requests agree on inputs[:end] (one end per question) past the
    `shared` tokens that base holds: their contexts as rows of one ragged batch, then their
    tails as rows of another."""
    device = model.tok_embeddings.weight.device
    contexts = [q[0][0][shared:end] for q, end in zip(questions, ends)]
    tails = [[inputs[end:] for inputs, _ in q if len(inputs) > end] for q, end in zip(questions, ends)]
    cache = base.select([0] * len(questions))
    hidden = []  # the hidden states scored tokens read from: every context's, then every tail's
    if any(contexts):
        hidden.append(ragged_hidden(model, contexts, cache))
    if any(tails):
        cache = cache.select([b for b, q in enumerate(tails) for _ in q])  # each context fans out to its tails
        hidden.append(ragged_hidden(model, [t for q in tails for t in q], cache))
    starts = list(itertools.accumulate(map(len, contexts + [t for q in tails for t in q]), initial=0))

    # the last len(target) input positions predict the targets; a position before its
    # question's end is in its context (row b), a later one in its request's tail
    index, targets, tail = [], [], len(questions)
    for b, (q, end) in enumerate(zip(questions, ends)):
        for inputs, target in q:
            for pos in range(len(inputs) - len(target), len(inputs)):
                index.append(starts[b] + pos - shared if pos < end else starts[tail] + pos - end)
            tail += len(inputs) > end
            targets += target
    logprobs = F.log_softmax(model.logits(torch.cat(hidden)[torch.tensor(index, device=device)]), dim=-1)
    token_lls = logprobs.gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1)
    lls = iter(t.sum().item() for t in token_lls.split([len(t) for q in questions for _, t in q]))
    return [[next(lls) for _ in q] for q in questions]


def ragged_hidden(model, rows, cache):
    """Final-norm hidden states of rows of token ids of different lengths, row b continuing
    row b of cache (one with room for every row whole: no chunks, as score_cached's): model.hidden's
    for each row alone, as one [tokens, dim] matrix, row after
    row, without the work a right-padded batch does on its padding. The linear layers (over
    80% of the work at a real model's shape) take the rows' own tokens as that matrix; only
    attention sees them right-padded to [rows, longest], where causal masking keeps the padding
    from every real token, and the cache stores each row's own tokens alone (KVCache.add's
    lengths). The loop is Transformer._blocks' and Attention.forward's on that matrix."""
    lengths = [len(r) for r in rows]
    B, T = len(rows), max(lengths)
    device = model.tok_embeddings.weight.device
    own = torch.arange(T, device=device) < torch.tensor(lengths, device=device)[:, None]  # [B, T]: not padding
    q_pos, k_pos = cache.add(T, lengths)
    mask = window_mask(q_pos, k_pos, model.args.sliding_window)
    x = model.tok_embeddings(torch.tensor([t for r in rows for t in r], device=device))
    cos, sin = (t.to(x.dtype) for t in rope_cos_sin(q_pos, model.args.head_dim, model.args.rope_theta))

    def heads(t, n):  # [tokens, n * head_dim] -> [B, n, T, head_dim], zeros at the padding
        return t.new_zeros(B, T, t.shape[-1]).index_put_((own,), t).view(B, T, n, -1).transpose(1, 2)

    for i, layer in enumerate(model.layers):
        att, h = layer.attention, layer.attention_norm(x)
        q, k, v = heads(att.wq(h), att.n_heads), heads(att.wk(h), att.n_kv_heads), heads(att.wv(h), att.n_kv_heads)
        k, v = cache.keys_values(i, apply_rope(k, cos, sin), v)
        y = attend(apply_rope(q, cos, sin), k, v, mask).transpose(1, 2)[own]  # [tokens, n_heads, head_dim]
        x = x + att.wo(y.flatten(1))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return model.norm(x)


# ----------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class Generation:
    """How a generative task is answered: greedy pass@1 by default; samples=N with a
    temperature scores the mean over N completions of each problem (how DeepScaleR reports)."""
    max_gen_toks: int | None = None  # None: the task's own
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False  # the prompt as the user's turn of the chat template (the harness's --apply_chat_template)


def encode_prompt(tokenizer, text, chat, max_prompt):
    """Prompt ids as the harness's HF backend builds them: the tokenizer's default special
    tokens (BOS), cut from the left to leave room for the generation. With chat, the text is
    the user's message and the ids end by opening the assistant's turn."""
    if chat:
        ids, _ = encode_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(text, add_special_tokens=True)
    return ids[-max_prompt:]


def decode_completion(tokenizer, ids, until):
    """(text, stopped_by) of a completion: the text cut as the harness cuts it, at the first
    occurrence of each stop string in turn; stopped_by names the stop string that ended it,
    or "eos", or "max_gen_toks"."""
    text = tokenizer.decode(ids)
    hits = sorted((text.index(s), s) for s in until if s in text)
    for s in until:
        text = text.split(s)[0]
    if hits:
        return text, hits[0][1]
    return text, "eos" if ids and ids[-1] == tokenizer.eos_id else "max_gen_toks"


def complete(model, tokenizer, prompts, until, gen, batch_size, progress):
    """gen.samples completions of each prompt -> per prompt [(text, stopped_by)], at most
    gen.max_gen_toks tokens each; prompts: {the problem's place in the task: token ids}. A row
    stops at EOS or as soon as its text holds a stop string."""
    stop = (lambda ids: any(s in tokenizer.decode(ids) for s in until)) if until else None
    sampling = Sampling(gen.temperature, top_p=gen.top_p)
    device = model.tok_embeddings.weight.device
    # longest first, so a batch holds prompts of similar lengths; a prompt's samples side by
    # side, so that generate prefills it once
    rows = [(p, j) for p in sorted(prompts, key=lambda p: -len(prompts[p])) for j in range(gen.samples)]
    # completion j of problem p draws from its own generator: neither the batches nor the ranks move it
    out = {p: [] for p in prompts}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        new = generate(model, [prompts[p] for p, _ in batch], gen.max_gen_toks, sampling, eos_id=tokenizer.eos_id,
                       stop=stop, generator=[seeded_generator((gen.seed, p, j), device) for p, j in batch])
        for (p, _), ids in zip(batch, new):
            out[p].append(decode_completion(tokenizer, ids, until))
        progress.update(len(batch))
    return out


def generation_limit(task, gen, max_len):
    max_new = gen.max_gen_toks or task.max_gen_toks
    if max_new >= max_len:  # the harness's check: the prompt gets max_len - max_new tokens
        raise EvalError(f"{task.name}: a generation limit of {max_new} tokens leaves no room for a prompt in the "
                        f"model's context of {max_len} (set --max_gen_toks below it)")
    return max_new


def evaluate_generative(model, tokenizer, task, subtasks, batch_size, gen, progress):
    """Per problem of this rank's share (every world_size-th) its prompt, completions and verdicts."""
    max_len = model.args.max_seq_len
    gen = replace(gen, max_gen_toks=generation_limit(task, gen, max_len))
    docs = [doc for _, subtask_docs in subtasks for doc in subtask_docs]
    texts = {p: fewshot_prefix(task, docs[p][0], docs[p][2]) + docs[p][1].prompt for p in my_share(len(docs))}
    prompts = {p: encode_prompt(tokenizer, text, gen.chat, max_len - gen.max_gen_toks) for p, text in texts.items()}
    outs = complete(model, tokenizer, prompts, task.until, gen, batch_size, progress)
    items = []
    for p, text in texts.items():
        problem, completions = docs[p][1], []
        for out, stopped_by in outs[p]:
            extracted, scores = task.grade(problem, out)
            completions.append({"text": out, "stopped_by": stopped_by, "extracted": extracted, "scores": scores})
        scores = {m: mean([c["scores"][m] for c in completions]) for m in completions[0]["scores"]}
        items.append({"prompt": text, "gold": problem.answer, "scores": scores, "completions": completions})
    return items


def generative_metrics(items):
    """Each metric: the mean over problems of its mean over the problem's samples."""
    result = {}
    for metric in items[0]["scores"]:
        values = [item["scores"][metric] for item in items]
        result.update({metric: mean(values), metric + "_stderr": mean_stderr(values)})
    result["n"] = len(items)
    return result


# ----------------------------------------------------------------------------- metrics

def argmax(xs):
    return max(range(len(xs)), key=lambda i: xs[i])  # the first of ties, as numpy's


def mean(xs):
    return sum(xs) / len(xs)


def mean_stderr(xs):
    """The harness's standard error of a mean: sample standard deviation / sqrt(n)."""
    if len(xs) < 2:
        return None
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def pooled_stderr(stderrs, sizes):
    """MMLU's stderr as the harness pools its subjects' (pooled variance, size-weighted)."""
    if any(s is None for s in stderrs):
        return None
    variance = sum((n - 1) * se ** 2 * n for se, n in zip(stderrs, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(variance / sum(sizes))


def metrics(task, items):
    acc = [float(it["pred"] == it["gold"]) for it in items]
    out = {"acc": mean(acc), "acc_stderr": mean_stderr(acc)}
    if task.acc_norm:
        acc_norm = [float(it["pred_norm"] == it["gold"]) for it in items]
        out.update(acc_norm=mean(acc_norm), acc_norm_stderr=mean_stderr(acc_norm))
    out["n"] = len(items)
    return out


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, tokenizer, task_name, num_fewshot=None, data_dir="", limit=None, batch_size=16, gen=Generation()):
    """Score one task, with num_fewshot shots (None: the task's own), reading its data from the
    hub or data_dir. Returns {"metrics": {...}, "items": [...]} with items in dataset order (MMLU:
    by subject): per question its subtask (the task, or the MMLU subject), gold, lls, pred and
    pred_norm; per generated problem its
    prompt, gold, scores and completions. metrics["seconds"] times the scoring alone."""
    task = get_task(task_name)
    k = task.num_fewshot if num_fewshot is None else num_fewshot
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise EvalError(f"--num_fewshot must be an integer >= 0, got {k!r}")
    if k and task.fewshot_split is None:
        raise EvalError(f"{task.name} is zero-shot: it has no split to draw shots from")
    if gen.chat and not task.grade:
        raise EvalError(f"--chat applies to generative tasks, and {task.name} is multiple choice")
    if task.grade:
        generation_limit(task, gen, model.args.max_seq_len)
    subtasks = load_units(task, k, data_dir or None, limit)  # (name, docs): the task, or each MMLU subject
    n = sum(len(docs) for _, docs in subtasks)
    mine = sum(len(my_share(len(docs))) for _, docs in subtasks) if not task.grade else len(my_share(n))
    # disable=None: the bar shows on a terminal only
    bar = tqdm(total=mine * (gen.samples if task.grade else 1), desc=f"{task_name} {k}-shot", disable=None,
               unit="completion" if task.grade else "q")
    start = time.time()
    if task.grade:
        items = gather_shares(evaluate_generative(model, tokenizer, task, subtasks, batch_size, gen, bar))
        result = generative_metrics(items)
    else:
        subtask_items = [gather_shares(s) for s in evaluate_choices(model, tokenizer, task, subtasks, batch_size, bar)]
        items, result = [item for s in subtask_items for item in s], choice_metrics(task, subtask_items)
    bar.close()
    seconds = time.time() - start
    result.update(num_fewshot=k, seconds=round(seconds, 2), items_per_s=round(n / seconds, 3))
    return {"metrics": result, "items": items}


def evaluate_choices(model, tokenizer, task, subtasks, batch_size, progress):
    """Per subtask, per question of this rank's share (every world_size-th) its subtask, gold,
    log-likelihoods and answers."""
    max_len = model.args.max_seq_len
    items = []
    for subtask, docs in subtasks:
        mine = [docs[i] for i in my_share(len(docs))]
        questions = [[encode_pair(tokenizer, c, cont, max_len) for c, cont in prompt_pairs(task, row, item, shots)]
                     for row, item, shots in mine]
        subtask_items = []
        for (_, item, _), lls in zip(mine, score_cached(model, questions, batch_size, progress)):
            norm = [ll / len(choice) for ll, choice in zip(lls, item.choices)]
            subtask_items.append({"subtask": subtask, "gold": item.gold, "lls": lls,
                                  "pred": argmax(lls), "pred_norm": argmax(norm)})
        items.append(subtask_items)
    return items


def choice_metrics(task, subtask_items):
    """acc (and acc_norm) over every question; MMLU: the micro-average, and each subject's."""
    result = metrics(task, [item for items in subtask_items for item in items])
    if task.name == "mmlu":
        subjects = {items[0]["subtask"]: metrics(task, items) for items in subtask_items}
        result["acc_stderr"] = pooled_stderr([m["acc_stderr"] for m in subjects.values()],
                                             [m["n"] for m in subjects.values()])
        result["subjects"] = subjects
    return result


# ----------------------------------------------------------------------------- data parallel (torchrun)

def my_share(n):
    """The places of n items this rank scores: every world_size-th from its rank (all, in one process)."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return range(rank, n, world_size)


def gather_shares(items):
    """Every rank's my_share of one list of items, merged back into the list's order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, items)
    return [shares[k % len(shares)][k // len(shares)] for k in range(sum(map(len, shares)))]


def table(results):
    fmt = lambda x: "   n/a" if x is None else f"{x:.4f}"
    lines = [f"{'task':<15}{'shots':>5}  {'metric':<29}{'value':>7}{'stderr':>9}{'n':>7}{'items/s':>9}"]
    for name, m in results.items():
        for metric in [key for key in m if key + "_stderr" in m]:
            lines.append(f"{name:<15}{m['num_fewshot']:>5}  {metric:<29}{fmt(m[metric]):>7}"
                         f"{fmt(m[metric + '_stderr']):>9}{m['n']:>7}{m['items_per_s']:>9.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def positive(name, value, unset_ok=False):
    """value, or EvalError unless it is an integer >= 1 (or None, where unset_ok)."""
    if value is None and unset_ok:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvalError(f"--{name} must be a positive integer, got {value!r}")
    return value


def task_runs(task_names, suite_name, shots):
    """The (task, shots) runs asked for: a suite's, or each of the comma-separated task_names with shots."""
    if bool(task_names) == bool(suite_name):
        raise EvalError("give either --tasks or --suite")
    if suite_name and suite_name not in SUITES:
        raise EvalError(f"unknown suite '{suite_name}' (known: {', '.join(SUITES)})")
    runs = SUITES[suite_name] if suite_name else [(name, shots) for name in str(task_names).split(",")]
    for name, _ in runs:
        get_task(name)
    return runs


def generation_settings(max_gen_toks, samples, temperature, top_p, seed, chat):
    """The Generation these settings ask for, or EvalError."""
    positive("max_gen_toks", max_gen_toks, unset_ok=True)
    positive("samples", samples)
    try:
        Sampling(temperature, top_p=top_p)
    except ValueError as e:
        raise EvalError(f"--{e}") from None
    if samples > 1 and temperature == 0:
        raise EvalError("--samples > 1 needs --temperature > 0: greedy completions are all the same")
    return Generation(max_gen_toks, samples, temperature, top_p, seed, chat)


def run_tasks(model, tokenizer, runs, data_dir, limit, batch_size, gen):
    """{task: metrics}, {task: items} of each (task, shots) run."""
    results, items = {}, {}
    for name, shots in runs:
        result = evaluate(model, tokenizer, name, shots, data_dir, limit, batch_size, gen)
        results[name], items[name] = result["metrics"], result["items"]
    return results, items


def main(argv=None):
    config = {k: globals()[k] for k in config_keys}  # a copy: main may run more than once in a process (tests)
    configure(config, config_keys, argv)
    c = SimpleNamespace(**config)
    rank = 0
    if "RANK" in os.environ:  # under torchrun each rank scores a share of every task (my_share), on its own GPU
        from trainer import setup_distributed  # only here: trainer's imports add a second to every start
        rank, _, rank_device = setup_distributed()
        c.device = str(rank_device) if rank_device.type == "cuda" else c.device
    try:
        if not c.ckpt:
            raise EvalError("give --ckpt: a .pt checkpoint of this project, an HF model directory or hub id")
        runs = task_runs(c.tasks, c.suite, c.num_fewshot)
        positive("limit", c.limit, unset_ok=True)
        positive("batch_size", c.batch_size)
        gen = generation_settings(c.max_gen_toks, c.samples, c.temperature, c.top_p, c.seed, c.chat)
        if c.log_samples and not c.out:
            raise EvalError("--log_samples writes into --out: give --out FILE.json")
        dtype = c.dtype if c.dtype != "auto" else "bfloat16" if c.device.startswith("cuda") else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise EvalError(f"--dtype must be auto, float32, bfloat16 or float16, got {c.dtype}")
        model, tokenizer_spec = load_model(c.ckpt, device=c.device, dtype=getattr(torch, dtype))
        results, items = run_tasks(model, Tokenizer.load(tokenizer_spec), runs, c.data_dir, c.limit, c.batch_size, gen)
    except ValueError as e:  # EvalError, TaskError, ModelLoadError and the tokenizer's errors
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(table(results))
    if rank == 0 and c.out:
        with open(c.out, "w") as f:
            json.dump({"ckpt": c.ckpt, "results": results, **({"samples": items} if c.log_samples else {})},
                      f, indent=2)


if __name__ == "__main__":
    main()
