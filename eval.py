"""
Log-likelihood multiple-choice evaluation: ARC-Easy/Challenge, HellaSwag, PIQA,
Winogrande and MMLU, zero- and few-shot, defined and scored the way
lm-evaluation-harness 0.4 does it, so the numbers agree with it item by item.

    python eval.py --ckpt out/final.pt --suite moxin_zeroshot
    python eval.py --ckpt path/to/hf_model --tasks mmlu --num_fewshot 5 --out mmlu.json

Data comes from the Hugging Face hub (the harness's dataset paths and splits), or
from --data_dir DIR with DIR/<task>/<split>.jsonl in the dataset's own schema.

A question becomes one (context, continuation) pair per choice. The model's
log-likelihood of each continuation given its context picks the answer: acc takes
the largest, acc_norm divides each by the choice's length in characters first, so
long answers are not penalised for being long.

The harness runs every pair as its own sequence. Here the work is shared through
the KV cache, and every scored token still reads exactly the tokens the harness
feeds it, at the same positions:
  - the prefix common to all questions of a task (MMLU: a subject's header and its
    five dev-set shots) is computed once;
  - a question's context is computed once, then the cache fans out to its choices,
    whose continuations run as one right-padded batch;
  - questions whose contexts have the same length run as one batch;
  - logits (a dim x vocab matmul per token) only where a continuation token is scored.
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import KVCache
from tokenizer import Tokenizer
from weights import load_model


class EvalError(ValueError):
    """Bad input; the command line prints it as one line."""


# ----------------------------------------------------------------------------- tasks

@dataclass
class Item:
    """A question ready to score: one (context, continuation) pair per choice."""
    pairs: list
    gold: int
    choices: list  # acc_norm divides by len(choice), the harness's doc_to_choice

    def solved(self):
        """The question with its gold answer: a few-shot example, or capability training text."""
        return "".join(self.pairs[self.gold])


def question(context, choices, gold):
    # the harness's target delimiter " " opens every continuation
    return Item([(context, " " + c) for c in choices], gold, choices)


def render_arc(doc):
    # answer keys are letters or digits; the gold is the key's position among the labels
    gold = doc["choices"]["label"].index(doc["answerKey"])
    return question(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], gold)


def clean_hellaswag(text):
    # the WikiHow half of HellaSwag carries markup: " [title]" ends a heading, other [tags] go
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def render_hellaswag(doc):
    context = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return question(clean_hellaswag(context), [clean_hellaswag(e) for e in doc["endings"]], int(doc["label"]))


def render_piqa(doc):
    return question(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def render_winogrande(doc):
    # "partial scoring": each option completes the sentence up to the blank, and the
    # rest of the sentence, the same for both, is the continuation that is scored
    blank = doc["sentence"].index("_")
    options = [doc["sentence"][:blank] + doc[o] for o in ("option1", "option2")]
    rest = " " + doc["sentence"][blank + 1:].strip()
    return Item([(o, rest) for o in options], {"1": 0, "2": 1}[doc["answer"]], options)


def render_mmlu(doc):
    c = doc["choices"]
    text = f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return question(text, ["A", "B", "C", "D"], int(doc["answer"]))


def mmlu_header(doc):
    return f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"


@dataclass(frozen=True)
class Task:
    """Where a task's data lives and how a row becomes a prompt, as the harness's YAML says."""
    name: str
    hf_path: str
    hf_name: str | None
    eval_split: str
    fewshot_split: str
    fields: tuple
    render: object
    acc_norm: bool
    # When a task config names no test split the harness keeps the question out of its
    # own shots: it draws k + 1 and drops the question. This changes the random stream.
    shots_skip_question: bool
    first_n_shots: bool = False  # MMLU: the dev split's first k, the same for every question
    header: object = lambda doc: ""


ARC_FIELDS = ("question", "choices", "answerKey")
TASKS = {t.name: t for t in [
    Task("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", "train", ARC_FIELDS, render_arc, True, False),
    Task("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "train", ARC_FIELDS, render_arc, True, False),
    Task("hellaswag", "Rowan/hellaswag", None, "validation", "train",
         ("activity_label", "ctx_a", "ctx_b", "endings", "label"), render_hellaswag, True, True),
    Task("piqa", "baber/piqa", None, "validation", "train", ("goal", "sol1", "sol2", "label"), render_piqa, True, True),
    Task("winogrande", "allenai/winogrande", "winogrande_xl", "validation", "train",
         ("sentence", "option1", "option2", "answer"), render_winogrande, False, True),
    Task("mmlu", "cais/mmlu", None, "test", "dev", ("question", "subject", "choices", "answer"), render_mmlu,
         False, False, first_n_shots=True, header=mmlu_header),
]}
# the 57 MMLU subjects: one dataset config (and one harness task) each
MMLU_SUBJECTS = """abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology
college_chemistry college_computer_science college_mathematics college_medicine college_physics
computer_security conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic
global_facts high_school_biology high_school_chemistry high_school_computer_science
high_school_european_history high_school_geography high_school_government_and_politics
high_school_macroeconomics high_school_mathematics high_school_microeconomics high_school_physics
high_school_psychology high_school_statistics high_school_us_history high_school_world_history human_aging
human_sexuality international_law jurisprudence logical_fallacies machine_learning management marketing
medical_genetics miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory
professional_accounting professional_law professional_medicine professional_psychology public_relations
security_studies sociology us_foreign_policy virology world_religions""".split()
# the two suites Moxin-7B reports its base model on: (task, shots)
SUITES = {
    "moxin_zeroshot": [("hellaswag", 0), ("winogrande", 0), ("piqa", 0), ("arc_easy", 0), ("arc_challenge", 0)],
    "moxin_fewshot": [("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("winogrande", 5)],
}
FEWSHOT_SEED = 1234  # the harness's default fewshot_random_seed


def get_task(name):
    if name not in TASKS:
        raise EvalError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]


def render_rows(task, rows, where):
    """Check and render rows; where(i) names row i (file and line) for error messages."""
    items = []
    for i, row in enumerate(rows):
        missing = [f for f in task.fields if f not in row]
        if missing:
            raise EvalError(f"{where(i)}: missing field '{missing[0]}'")
        try:
            items.append(task.render(row))
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            raise EvalError(f"{where(i)}: cannot render this {task.name} row ({type(e).__name__}: {e})") from None
    return items


def render_examples(task_name, docs):
    """Rows in the HF schema -> texts in exactly the format eval.py prompts with: the
    zero-shot context, the target delimiter " " and the gold continuation. data.py
    writes phase-3 capability text from the benchmarks' training splits with it."""
    task = get_task(task_name)
    items = render_rows(task, docs, lambda i: f"{task_name} row {i}")
    return [task.header(doc) + item.solved() for doc, item in zip(docs, items)]


# ----------------------------------------------------------------------------- data

def read_split(task, split, data_dir):
    """(rows, items) of one split, from DIR/<task>/<split>.jsonl or from the HF hub."""
    if data_dir:
        path = os.path.join(data_dir, task.name, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise EvalError(f"{path} not found: --data_dir needs {task.name}/{split}.jsonl")
        rows, lines = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise EvalError(f"{path} line {n}: not JSON ({e.msg})") from None
                    lines.append(n)
        return rows, render_rows(task, rows, lambda i: f"{path} line {lines[i]}")
    import datasets  # slow to import; only the hub path needs it

    rows = []
    for name in MMLU_SUBJECTS if task.name == "mmlu" else [task.hf_name]:
        try:
            rows += datasets.load_dataset(task.hf_path, name, split=split).to_list()
        except Exception as e:
            first_line = (str(e).splitlines() or [""])[0]
            raise EvalError(f"cannot load {task.hf_path} ({name}) split {split} from the Hugging Face hub: "
                            f"{type(e).__name__}: {first_line} (or use --data_dir)") from None
    return rows, render_rows(task, rows, lambda i: f"{task.hf_path} {split} row {i}")


def draw_shots(task, docs, pool, k, pool_name):
    """Few-shot examples per question, drawn as the harness draws them: one
    Random(1234) per harness task, used question after question in order."""
    need = k + 1 if task.shots_skip_question and k else k
    if len(pool) < need:
        extra = " (one more than k: the question itself is skipped)" if need > k else ""
        raise EvalError(f"{task.name}: {k} shots need {need} rows{extra}, but {pool_name} has {len(pool)}")
    if k == 0 or task.first_n_shots:
        return [pool[:k]] * len(docs)
    rnd, shots = random.Random(FEWSHOT_SEED), []
    for doc, _ in docs:
        if not task.shots_skip_question:
            shots.append(rnd.sample(pool, k))
            continue
        drawn = [s for s in rnd.sample(pool, k + 1) if s[0] != doc][:k]
        if len(drawn) < k:  # the pool holds several copies of the question
            drawn = rnd.sample([s for s in pool if s[0] != doc], k)
        shots.append(drawn)
    return shots


def load_units(task, k, data_dir, limit):
    """The harness tasks behind a task, as (name, [(row, item, shots)]); MMLU has one
    per subject, each with its own shots and limit. Questions of one unit that share
    a prompt prefix share its computation."""
    docs = list(zip(*read_split(task, task.eval_split, data_dir)))
    if not docs:
        raise EvalError(f"{task.name}: its {task.eval_split} split has no rows")
    pool = list(zip(*read_split(task, task.fewshot_split, data_dir))) if k else []
    if task.name != "mmlu":
        docs = docs[:limit]
        shots = draw_shots(task, docs, pool, k, f"its {task.fewshot_split} split")
        return [(task.name, [(row, item, s) for (row, item), s in zip(docs, shots)])]
    units = []
    for subject in dict.fromkeys(row["subject"] for row, _ in docs):  # first-seen order
        sub_docs = [d for d in docs if d[0]["subject"] == subject][:limit]
        sub_pool = [d for d in pool if d[0]["subject"] == subject]
        shots = draw_shots(task, sub_docs, sub_pool, k, f"subject {subject} of its {task.fewshot_split} split")
        units.append((subject, [(row, item, s) for (row, item), s in zip(sub_docs, shots)]))
    return units


def prompt_pairs(task, row, item, shots):
    # header, then each shot solved and closed by the few-shot delimiter "\n\n", then the question
    prefix = task.header(row) + "".join(shot.solved() + "\n\n" for _, shot in shots)
    return [(prefix + context, continuation) for context, continuation in item.pairs]


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

def common_prefix_len(seqs):
    # os.path.commonprefix works on any sequences, comparing whole lists at C speed
    return len(os.path.commonprefix(seqs))


@torch.no_grad()
def score_unit(model, questions, batch_size, progress):
    """Log-likelihood of every request. questions: per question a list of (inputs, targets).

    Three levels of sharing: the `shared` tokens that begin every request of the unit
    are prefilled once; a question's requests agree up to `end` (its context), computed
    once per question; the rest of each request is a row of a right-padded batch."""
    weight = model.tok_embeddings.weight
    requests = [r for q in questions for r in q]
    # stop before the first scored position: the shared tokens' hidden states are never read
    first_scored = min(len(inputs) - len(targets) for inputs, targets in requests)
    shared = min(common_prefix_len([inputs for inputs, _ in requests]), first_scored)
    base = KVCache(model.args, 1, weight.device, weight.dtype, max_tokens=max(len(i) for i, _ in requests))
    if shared:
        model.hidden(torch.tensor([requests[0][0][:shared]], device=weight.device), base)

    ends = [common_prefix_len([inputs for inputs, _ in q]) for q in questions]
    # cache rows a question needs: one for its context, then one per request that goes past it
    rows = [max(1, sum(len(inputs) > end for inputs, _ in q)) for q, end in zip(questions, ends)]
    # longest first, like the harness; then by the longest request, so a batch's tails pad little
    order = sorted(range(len(questions)), key=lambda i: (ends[i], max(len(r[0]) for r in questions[i])), reverse=True)
    scores = [None] * len(questions)
    # a question whose requests all end with its context (MMLU: one-letter answers) needs no
    # cache past it, so it may join a batch of longer contexts, right-padded
    no_tail = [all(len(inputs) <= end for inputs, _ in q) for q, end in zip(questions, ends)]
    while order:
        # questions whose contexts end at the same position, so all cache rows sit at one
        # position, or that need no cache past their context; at most batch_size rows (the
        # first question always fits)
        batch = [order.pop(0)]
        while order and (ends[order[0]] == ends[batch[0]] or no_tail[order[0]] and no_tail[batch[0]]) \
                and sum(rows[i] for i in batch + order[:1]) <= batch_size:
            batch.append(order.pop(0))
        for i, lls in zip(batch, score_batch(model, base, shared, ends[batch[0]], [questions[i] for i in batch])):
            scores[i] = lls
        progress.update(len(batch))
    return scores


def score_batch(model, base, shared, end, questions):
    """Score questions whose requests agree on inputs[:end]; base holds inputs[:shared]."""
    device = model.tok_embeddings.weight.device
    tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)
    cache = base.select([0] * len(questions))
    hidden = []  # the hidden states scored tokens read from, flattened to [tokens, dim]
    context_len = end - shared
    if context_len:
        # right-padded to the longest: causal, so padding after a row's last token changes nothing before it
        contexts = [q[0][0][shared:end] for q in questions]
        contexts = tensor([c + [0] * (context_len - len(c)) for c in contexts])
        hidden.append(model.hidden(contexts, cache).flatten(0, 1))
    tails = [[inputs[end:] for inputs, _ in q if len(inputs) > end] for q in questions]
    width = max((len(t) for q in tails for t in q), default=0)
    if width:
        cache = cache.select([i for i, q in enumerate(tails) for _ in q])  # each context fans out to its choices
        # causal attention: the padding after a row's last token changes nothing before it
        padded = tensor([t + [0] * (width - len(t)) for q in tails for t in q])
        hidden.append(model.hidden(padded, cache).flatten(0, 1))

    # where each scored position's hidden state is: the last len(target) input positions
    # predict the targets; a position before `end` is in the question's context (row b),
    # a later one in its request's tail (the `tail`-th tail row)
    index, targets, tail = [], [], 0
    for b, q in enumerate(questions):
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

def evaluate(model, tokenizer, task_name, num_fewshot=0, data_dir=None, limit=None, batch_size=16, progress=True):
    """Score one task. Returns {"metrics": {...}, "items": [per question: unit, gold, lls,
    pred, pred_norm]} with items in dataset order (MMLU: by subject)."""
    task = get_task(task_name)
    if num_fewshot < 0:
        raise EvalError(f"--num_fewshot must be >= 0, got {num_fewshot}")
    units = load_units(task, num_fewshot, data_dir, limit)
    max_len = model.args.max_seq_len
    bar = tqdm(total=sum(len(docs) for _, docs in units), desc=f"{task_name} {num_fewshot}-shot",
               disable=not progress, unit="q")
    items, unit_metrics = [], {}
    start = time.time()
    for unit, docs in units:
        questions = [[encode_pair(tokenizer, c, cont, max_len) for c, cont in prompt_pairs(task, row, item, shots)]
                     for row, item, shots in docs]
        unit_items = []
        for (_, item, _), lls in zip(docs, score_unit(model, questions, batch_size, bar)):
            norm = [ll / len(choice) for ll, choice in zip(lls, item.choices)]
            unit_items.append({"unit": unit, "gold": item.gold, "lls": lls,
                               "pred": argmax(lls), "pred_norm": argmax(norm)})
        unit_metrics[unit] = metrics(task, unit_items)
        items += unit_items
    bar.close()
    seconds = time.time() - start
    result = metrics(task, items)
    if task.name == "mmlu":  # the micro-average over all questions, and each subject
        result["acc_stderr"] = pooled_stderr([m["acc_stderr"] for m in unit_metrics.values()],
                                             [m["n"] for m in unit_metrics.values()])
        result["subjects"] = unit_metrics
    result.update(num_fewshot=num_fewshot, seconds=round(seconds, 2), items_per_s=round(len(items) / seconds, 3))
    return {"metrics": result, "items": items}


def table(results):
    fmt = lambda x: "   n/a" if x is None else f"{x:.4f}"
    lines = [f"{'task':<15}{'shots':>5}  {'metric':<9}{'value':>7}{'stderr':>9}{'n':>7}{'items/s':>9}"]
    for name, m in results.items():
        for metric in ("acc", "acc_norm"):
            if metric in m:
                lines.append(f"{name:<15}{m['num_fewshot']:>5}  {metric:<9}{fmt(m[metric]):>7}"
                             f"{fmt(m[metric + '_stderr']):>9}{m['n']:>7}{m['items_per_s']:>9.2f}")
    return "\n".join(lines)


def extract_boxed(text):
    """SHIM until the MATH grader lands: the contents of the last \\boxed{...} in text (braces matched), or None."""
    start = text.rfind('\\boxed{')
    if start < 0:
        return None
    depth, i = 0, start + len('\\boxed')
    for j in range(i, len(text)):
        depth += {'{': 1, '}': -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def math_reward(completion_text, answer):
    """SHIM: 1.0 if the last \\boxed{} of the completion equals the answer (spaces ignored), else 0.0."""
    boxed = extract_boxed(completion_text)
    return float(boxed is not None and boxed.replace(' ', '') == str(answer).replace(' ', ''))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Log-likelihood multiple-choice evaluation, scored as "
                                                 "lm-evaluation-harness scores it.")
    parser.add_argument("--ckpt", required=True, help="a .pt checkpoint of this project or an HF model directory")
    parser.add_argument("--tasks", help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--num_fewshot", type=int, default=0, help="shots for every task of --tasks")
    parser.add_argument("--suite", choices=SUITES, help="Moxin's reported suites, each task with its own shots")
    parser.add_argument("--limit", type=int, help="only the first N questions of each task (MMLU: of each subject)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="most sequences (KV-cache rows) in one forward pass; memory grows with it")
    parser.add_argument("--data_dir", help="read DIR/<task>/<split>.jsonl (HF schema) instead of the HF hub")
    parser.add_argument("--out", help="write all metrics to this JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: float32 on CPU (no fast bf16 there), bfloat16 on CUDA")
    args = parser.parse_args(argv)
    try:
        if bool(args.tasks) == bool(args.suite):
            raise EvalError("give either --tasks or --suite")
        if args.suite:
            runs = SUITES[args.suite]
        else:
            runs = [(name, args.num_fewshot) for name in args.tasks.split(",")]
            for name, _ in runs:
                get_task(name)
        if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
            raise EvalError("--limit and --batch_size must be positive")

        dtype = args.dtype if args.dtype != "auto" else "bfloat16" if args.device.startswith("cuda") else "float32"
        model, tokenizer_spec = load_model(args.ckpt, device=args.device, dtype=getattr(torch, dtype))
        tokenizer = Tokenizer.load(tokenizer_spec)
        results = {}
        for name, shots in runs:
            result = evaluate(model, tokenizer, name, shots, args.data_dir, args.limit, args.batch_size)
            results[name] = result["metrics"]
    except ValueError as e:  # EvalError, ModelLoadError and the tokenizer's errors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ckpt": args.ckpt, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
