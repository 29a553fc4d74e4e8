"""
Benchmarks defined and scored the way lm-evaluation-harness 0.4 does it, so the numbers
agree with it item by item:

  log-likelihood multiple choice: ARC-Easy/Challenge, HellaSwag, PIQA, Winogrande, MMLU
  generation: GSM8K (the harness's gsm8k task) and MATH-500 (DeepScaleR's prompt, a
  \\boxed{} answer graded by math_equal, the same function grpo.py rewards with)

    python eval.py --ckpt out/final.pt --suite moxin_zeroshot
    python eval.py --ckpt path/to/hf_model --tasks mmlu --num_fewshot 5 --out mmlu.json
    python eval.py --ckpt path/to/hf_model --tasks gsm8k --out gsm8k.json --log_samples
    python eval.py --ckpt path/to/reasoning_model --tasks math500 --chat --samples 16 --temperature 0.6

Data comes from the Hugging Face hub (the harness's dataset paths and splits), or
from --data_dir DIR with DIR/<task>/<split>.jsonl in the dataset's own schema.

Multiple choice: a question becomes one (context, continuation) pair per choice. The
model's log-likelihood of each continuation given its context picks the answer: acc
takes the largest, acc_norm divides each by the choice's length in characters first, so
long answers are not penalised for being long. score_reference computes it plainly;
score_unit, which eval uses, shares the work through the KV cache (see its docstring).

Generation: the prompt is encoded as the harness's HF backend encodes it, the model
writes until EOS, a stop string or the generation limit, and the text is cut before the
first stop string; each task's grader turns the text into an answer and a verdict.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import KVCache, check_sampling, generate
from tasks import SUITES, TASKS, fewshot_prefix, get_task, load_units, prompt_pairs
from tokenizer import Tokenizer, encode_chat
from weights import load_model


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
# len(targets) input positions. The reference scorer below does exactly that, one forward
# pass per request. score_unit gets the same numbers with far less work; it is tested
# against the reference.

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


def common_prefix_len(seqs):
    # os.path.commonprefix works on any sequences, comparing whole lists at C speed
    return len(os.path.commonprefix(seqs))


@torch.no_grad()
def score_unit(model, questions, batch_size, progress):
    """Log-likelihood of every request, as score_reference gives it; questions: per question
    a list of requests (inputs, targets).

    The work is shared at three levels, and every scored position still reads exactly the
    tokens, at the same positions, that its own forward pass would:
      1. the `shared` tokens that begin every request of the unit (MMLU: a subject's header
         and shots) are prefilled once into a one-row cache;
      2. the requests of a question agree up to its context's end; a batch of questions runs
         their contexts as one forward pass from that cache, a row each;
      3. each context row is then copied once per request (KVCache.select) and the rest of
         every request, its tail past the context, runs as one batch.
    Rows of different lengths are right-padded and passed with their lengths
    (Transformer.hidden): the padding costs no matmul and never enters the cache, so each row
    computes exactly its own tokens. A question whose requests all end with its context (MMLU:
    the answer is one letter, predicted from the context's last position) has no tails.
    Logits (a dim x vocab matmul per token) are computed only at the scored positions.
    Questions go in the harness's order, longest request first."""
    weight = model.tok_embeddings.weight
    requests = [r for q in questions for r in q]
    # stop before the first scored position: the shared tokens' hidden states are never read
    first_scored = min(len(inputs) - len(targets) for inputs, targets in requests)
    shared = min(common_prefix_len([inputs for inputs, _ in requests]), first_scored)
    base = KVCache(model.args, 1, weight.device, weight.dtype, max_tokens=max(len(i) for i, _ in requests))
    if shared:
        model.hidden(torch.tensor([requests[0][0][:shared]], device=weight.device), base)

    ends = [common_prefix_len([inputs for inputs, _ in q]) for q in questions]
    # cache rows a question needs: its context's, then one per request that goes past it
    rows = [max(1, sum(len(inputs) > end for inputs, _ in q)) for q, end in zip(questions, ends)]
    order = sorted(range(len(questions)), key=lambda i: max(len(r[0]) for r in questions[i]), reverse=True)
    scores = [None] * len(questions)
    while order:
        batch = [order.pop(0)]  # the first question always fits
        while order and sum(rows[i] for i in batch + order[:1]) <= batch_size:
            batch.append(order.pop(0))
        for i, lls in zip(batch, score_batch(model, base, shared, [ends[i] for i in batch],
                                             [questions[i] for i in batch])):
            scores[i] = lls
        progress.update(len(batch))
    return scores


def score_batch(model, base, shared, ends, questions):
    """Score questions whose requests agree on inputs[:end] (one end per question) past the
    `shared` tokens that base holds."""
    device = model.tok_embeddings.weight.device
    tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)
    cache = base.select([0] * len(questions))

    def run(rows, cache):  # hidden states of rows of any lengths, flattened to [rows x width, dim]
        width = max(map(len, rows))
        padded = tensor([r + [0] * (width - len(r)) for r in rows])
        return model.hidden(padded, cache, lengths=[len(r) for r in rows]).flatten(0, 1), width

    hidden = []  # the hidden states scored tokens read from
    context_len = 0
    if max(ends) > shared:
        h, context_len = run([q[0][0][shared:end] for q, end in zip(questions, ends)], cache)
        hidden.append(h)
    tails = [[inputs[end:] for inputs, _ in q if len(inputs) > end] for q, end in zip(questions, ends)]
    width = 0
    if any(tails):
        cache = cache.select([b for b, q in enumerate(tails) for _ in q])  # each context fans out to its tails
        h, width = run([t for q in tails for t in q], cache)
        hidden.append(h)

    # where each scored position's hidden state is: the last len(target) input positions
    # predict the targets; a position before its question's end is in the context (row b),
    # a later one in its request's tail (the `tail`-th tail row)
    index, targets, tail = [], [], 0
    for b, (q, end) in enumerate(zip(questions, ends)):
        for inputs, target in q:
            for pos in range(len(inputs) - len(target), len(inputs)):
                if pos < end:
                    index.append(b * context_len + pos - shared)
                else:
                    index.append(len(questions) * context_len + tail * width + pos - end)
            tail += len(inputs) > end
            targets += target
    logprobs = F.log_softmax(model.logits(torch.cat(hidden)[tensor(index)]), dim=-1)
    token_lls = logprobs.gather(1, tensor(targets)[:, None]).squeeze(1)
    lls = iter(t.sum().item() for t in token_lls.split([len(t) for q in questions for _, t in q]))
    return [[next(lls) for _ in q] for q in questions]


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


def finish(tokenizer, ids, until):
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
    """gen.samples completions of each prompt (token ids) -> per prompt [(text, stopped_by)],
    at most gen.max_gen_toks tokens each. A row stops at EOS or as soon as its text holds a stop string."""
    stop = (lambda ids: any(s in tokenizer.decode(ids) for s in until)) if until else None
    generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(gen.seed)
    # longest first, so a batch holds prompts of similar lengths; a prompt's samples side by
    # side, so that generate prefills it once
    rows = [i for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) for _ in range(gen.samples)]
    out = [[] for _ in prompts]
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        new = generate(model, [prompts[i] for i in batch], gen.max_gen_toks, temperature=gen.temperature, top_p=gen.top_p,
                       eos_id=tokenizer.eos_id, stop=stop, generator=generator)
        for i, ids in zip(batch, new):
            out[i].append(finish(tokenizer, ids, until))
        progress.update(len(batch))
    return out


def generation_limit(task, gen, max_len):
    max_new = gen.max_gen_toks or task.max_gen_toks
    if max_new >= max_len:  # the harness's check: the prompt gets max_len - max_new tokens
        raise EvalError(f"{task.name}: a generation limit of {max_new} tokens leaves no room for a prompt in the "
                        f"model's context of {max_len} (set --max_gen_toks below it)")
    return max_new


def evaluate_generative(model, tokenizer, task, units, batch_size, gen, progress):
    """Per problem its prompt, completions and verdicts, and the task's metrics: each metric is
    the mean over problems of its mean over the problem's samples."""
    max_len = model.args.max_seq_len
    gen = replace(gen, max_gen_toks=generation_limit(task, gen, max_len))
    docs = [doc for _, unit_docs in units for doc in unit_docs]
    texts = [fewshot_prefix(task, row, shots) + problem.prompt for row, problem, shots in docs]
    prompts = [encode_prompt(tokenizer, text, gen.chat, max_len - gen.max_gen_toks) for text in texts]
    items = []
    for text, (_, problem, _), outs in zip(texts, docs, complete(model, tokenizer, prompts, task.until, gen,
                                                                   batch_size, progress)):
        completions = []
        for out, stopped_by in outs:
            extracted, scores = task.grade(problem, out)
            completions.append({"text": out, "stopped_by": stopped_by, "extracted": extracted, "scores": scores})
        scores = {m: mean([c["scores"][m] for c in completions]) for m in completions[0]["scores"]}
        items.append({"prompt": text, "gold": problem.answer, "scores": scores, "completions": completions})
    result = {}
    for metric in items[0]["scores"]:
        values = [item["scores"][metric] for item in items]
        result.update({metric: mean(values), metric + "_stderr": mean_stderr(values)})
    result["n"] = len(items)
    return items, result


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

def evaluate(model, tokenizer, task_name, num_fewshot=None, data_dir=None, limit=None, batch_size=16,
             progress=True, gen=Generation()):
    """Score one task, with num_fewshot shots (None: the task's own). Returns {"metrics": {...},
    "items": [...]} with items in dataset order (MMLU: by subject): per question its unit, gold,
    lls, pred and pred_norm; per generated problem its prompt, gold, scores and completions."""
    task = get_task(task_name)
    k = task.num_fewshot if num_fewshot is None else num_fewshot
    if k < 0:
        raise EvalError(f"--num_fewshot must be >= 0, got {k}")
    if k and task.fewshot_split is None:
        raise EvalError(f"{task.name} is zero-shot: it has no split to draw shots from")
    if gen.chat and not task.grade:
        raise EvalError(f"--chat applies to generative tasks, and {task.name} is multiple choice")
    if task.grade:
        generation_limit(task, gen, model.args.max_seq_len)
    units = load_units(task, k, data_dir, limit)
    n = sum(len(docs) for _, docs in units)
    bar = tqdm(total=n * (gen.samples if task.grade else 1), desc=f"{task_name} {k}-shot", disable=not progress,
               unit="completion" if task.grade else "q")
    start = time.time()
    if task.grade:
        items, result = evaluate_generative(model, tokenizer, task, units, batch_size, gen, bar)
    else:
        items, result = evaluate_choices(model, tokenizer, task, units, batch_size, bar)
    bar.close()
    seconds = time.time() - start
    result.update(num_fewshot=k, seconds=round(seconds, 2), items_per_s=round(n / seconds, 3))
    return {"metrics": result, "items": items}


def evaluate_choices(model, tokenizer, task, units, batch_size, progress):
    max_len = model.args.max_seq_len
    items, unit_metrics = [], {}
    for unit, docs in units:
        questions = [[encode_pair(tokenizer, c, cont, max_len) for c, cont in prompt_pairs(task, row, item, shots)]
                     for row, item, shots in docs]
        unit_items = []
        for (_, item, _), lls in zip(docs, score_unit(model, questions, batch_size, progress)):
            norm = [ll / len(choice) for ll, choice in zip(lls, item.choices)]
            unit_items.append({"unit": unit, "gold": item.gold, "lls": lls,
                               "pred": argmax(lls), "pred_norm": argmax(norm)})
        unit_metrics[unit] = metrics(task, unit_items)
        items += unit_items
    result = metrics(task, items)
    if task.name == "mmlu":  # the micro-average over all questions, and each subject
        result["acc_stderr"] = pooled_stderr([m["acc_stderr"] for m in unit_metrics.values()],
                                             [m["n"] for m in unit_metrics.values()])
        result["subjects"] = unit_metrics
    return items, result


def table(results):
    fmt = lambda x: "   n/a" if x is None else f"{x:.4f}"
    lines = [f"{'task':<15}{'shots':>5}  {'metric':<29}{'value':>7}{'stderr':>9}{'n':>7}{'items/s':>9}"]
    for name, m in results.items():
        for metric in [key for key in m if key + "_stderr" in m]:
            lines.append(f"{name:<15}{m['num_fewshot']:>5}  {metric:<29}{fmt(m[metric]):>7}"
                         f"{fmt(m[metric + '_stderr']):>9}{m['n']:>7}{m['items_per_s']:>9.2f}")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Multiple-choice and generative benchmarks, scored as "
                                                 "lm-evaluation-harness scores them.")
    parser.add_argument("--ckpt", required=True, help="a .pt checkpoint of this project or an HF model directory")
    parser.add_argument("--tasks", help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--num_fewshot", type=int, help="shots for every task of --tasks (default: each task's own, "
                                                        "as the harness: gsm8k 5, the others 0)")
    parser.add_argument("--suite", choices=SUITES, help="Moxin's reported suites, each task with its own shots")
    parser.add_argument("--limit", type=int, help="only the first N questions of each task (MMLU: of each subject)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="most sequences (KV-cache rows) in one forward pass; memory grows with it")
    parser.add_argument("--data_dir", help="read DIR/<task>/<split>.jsonl (HF schema) instead of the HF hub")
    parser.add_argument("--out", help="write all metrics to this JSON file")
    parser.add_argument("--log_samples", action="store_true",
                        help="also write every item to --out: prompt, completions, extracted answers, gold, verdict")
    parser.add_argument("--chat", action="store_true", help="generative tasks: each prompt as the user's turn of "
                                                            "the chat template, the assistant's turn opened")
    parser.add_argument("--max_gen_toks", type=int, help="generation limit (default: gsm8k 256, math500 4096)")
    parser.add_argument("--samples", type=int, default=1, help="completions per problem; the score is their mean")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="of the sampling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: float32 on CPU (no fast bf16 there), bfloat16 on CUDA")
    return parser.parse_args(argv)


def check_args(args):
    """The (task, shots) runs and the generation settings the arguments ask for, or EvalError."""
    if bool(args.tasks) == bool(args.suite):
        raise EvalError("give either --tasks or --suite")
    runs = SUITES[args.suite] if args.suite else [(name, args.num_fewshot) for name in args.tasks.split(",")]
    for name, _ in runs:
        get_task(name)
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1 or args.samples < 1:
        raise EvalError("--limit, --batch_size and --samples must be positive")
    if args.max_gen_toks is not None and args.max_gen_toks < 1:
        raise EvalError(f"--max_gen_toks must be positive, got {args.max_gen_toks}")
    try:
        check_sampling(0, args.temperature, 0, args.top_p)
    except ValueError as e:
        raise EvalError(f"--{e}") from None
    if args.samples > 1 and args.temperature == 0:
        raise EvalError("--samples > 1 needs --temperature > 0: greedy completions are all the same")
    if args.log_samples and not args.out:
        raise EvalError("--log_samples writes into --out: give --out FILE.json")
    return runs, Generation(args.max_gen_toks, args.samples, args.temperature, args.top_p, args.seed, args.chat)


def main(argv=None):
    args = parse_args(argv)
    try:
        runs, gen = check_args(args)
        dtype = args.dtype if args.dtype != "auto" else "bfloat16" if args.device.startswith("cuda") else "float32"
        model, tokenizer_spec = load_model(args.ckpt, device=args.device, dtype=getattr(torch, dtype))
        tokenizer = Tokenizer.load(tokenizer_spec)
        results, samples = {}, {}
        for name, shots in runs:
            result = evaluate(model, tokenizer, name, shots, args.data_dir, args.limit, args.batch_size, gen=gen)
            results[name], samples[name] = result["metrics"], result["items"]
    except ValueError as e:  # EvalError, ModelLoadError and the tokenizer's errors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ckpt": args.ckpt, "results": results, **({"samples": samples} if args.log_samples else {})},
                      f, indent=2)


if __name__ == "__main__":
    main()
