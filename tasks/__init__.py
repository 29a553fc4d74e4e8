"""
The benchmarks: where each one's data lives, how a row becomes a prompt, and how an answer is
graded, all as lm-evaluation-harness 0.4 defines them (so eval.py agrees with it item by item).

    multiple choice   Item: one (context, continuation) pair per choice; the model's
                      log-likelihoods pick the answer (eval.py scores them)
    generation        Problem: a prompt and a gold answer; a grader turns the model's text into
                      a verdict: grade_gsm8k (the harness's regexes) and grade_math, the MATH
                      grader in tasks/math_grader.py, which is also grpo.py's reward

    TASKS, SUITES        the task definitions and the two suites Moxin-7B reports
    load_units(task, k)  a task's questions with their few-shot examples, from the HF hub or
                         from DIR/<task>/<split>.jsonl in the dataset's own schema
    render_examples      solved examples in the prompt format (data.py's phase-3 capability text)

Nothing here needs torch: data.py, chats.py, eval.py and grpo.py all read it.
"""
import json
import os
import random
import re
from dataclasses import dataclass

from tasks.math_grader import grade_math


class TaskError(ValueError):
    """Bad task input (an unknown task, a malformed row, a missing file); one line to the user."""

# ----------------------------------------------------------------------------- prompts

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


# generative tasks

@dataclass
class Problem:
    """A question answered by generation."""
    prompt: str
    target: str  # what a few-shot example shows after its prompt (gsm8k: the worked solution)
    answer: str  # what the grader compares the model's answer with

    def solved(self):
        """The problem with its solution, as a few-shot example (and capability training text) shows it."""
        return self.prompt + " " + self.target


def render_gsm8k(doc):
    # the reference is the whole worked solution: exact_match ignores everything up to its "#### "
    return Problem(f"Question: {doc['question']}\nAnswer:", doc["answer"], doc["answer"])


# DeepScaleR's instruction, appended to every problem after a space
# (rllm-org/rllm, scripts/data/deepscaler_dataset.py)
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def render_math500(doc):
    return Problem(f"{doc['problem']} {MATH_INSTRUCTION}", doc["answer"], doc["answer"])


# ----------------------------------------------------------------------------- graders
# grade(problem, text) -> ({filter: extracted answer}, {metric: score})

# The gsm8k YAML's two filter pipelines: a regex, which of its matches, then take_first.
# A match with several groups gives its first non-empty one; no match gives "[invalid]".
GSM8K_FILTERS = {
    "strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
# exact_match's regexes_to_ignore, removed from both sides in this order, then ignore_case
GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def regex_filter(text, regex, which, fallback="[invalid]"):
    matches = regex.findall(text)
    if not matches:
        return fallback
    match = matches[which]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def gsm8k_exact_match(prediction, reference):
    for pattern in GSM8K_IGNORE:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    return prediction.lower() == reference.lower()


def grade_gsm8k(problem, text):
    extracted = {name: regex_filter(text, regex, which) for name, (regex, which) in GSM8K_FILTERS.items()}
    scores = {f"exact_match,{name}": float(gsm8k_exact_match(answer, problem.answer))
              for name, answer in extracted.items()}
    return extracted, scores


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
    num_fewshot: int = 0  # shots when --num_fewshot is not given, as in the harness's YAML
    # generative tasks: stop strings, the generation limit when --max_gen_toks is not given
    # (the harness's max_gen_toks default for gsm8k), and the grader
    until: tuple = ()
    max_gen_toks: int = 0
    grade: object = None


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
    Task("gsm8k", "openai/gsm8k", "main", "test", "train", ("question", "answer"), render_gsm8k, False, False,
         num_fewshot=5, until=("Question:", "</s>", "<|im_end|>"), max_gen_toks=256, grade=grade_gsm8k),
    # zero-shot, no few-shot split; DeepScaleR's own evaluation lets a reasoning model write 32k tokens
    Task("math500", "HuggingFaceH4/MATH-500", None, "test", None, ("problem", "answer"), render_math500, False,
         False, max_gen_toks=4096, grade=grade_math),
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
        raise TaskError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]


def render_rows(task, rows, where):
    """Check and render rows; where(i) names row i (file and line) for error messages."""
    items = []
    for i, row in enumerate(rows):
        missing = [f for f in task.fields if f not in row]
        if missing:
            raise TaskError(f"{where(i)}: missing field '{missing[0]}'")
        try:
            items.append(task.render(row))
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            raise TaskError(f"{where(i)}: cannot render this {task.name} row ({type(e).__name__}: {e})") from None
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
    if split is None:
        raise TaskError(f"{task.name} has only its {task.eval_split} split")
    if data_dir:
        path = os.path.join(data_dir, task.name, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise TaskError(f"{path} not found: --data_dir needs {task.name}/{split}.jsonl")
        rows, lines = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise TaskError(f"{path} line {n}: not JSON ({e.msg})") from None
                    lines.append(n)
        return rows, render_rows(task, rows, lambda i: f"{path} line {lines[i]}")
    import datasets  # slow to import; only the hub path needs it

    rows = []
    for name in MMLU_SUBJECTS if task.name == "mmlu" else [task.hf_name]:
        try:
            rows += datasets.load_dataset(task.hf_path, name, split=split).to_list()
        except Exception as e:
            first_line = (str(e).splitlines() or [""])[0]
            raise TaskError(f"cannot load {task.hf_path} ({name}) split {split} from the Hugging Face hub: "
                            f"{type(e).__name__}: {first_line} (or use --data_dir)") from None
    return rows, render_rows(task, rows, lambda i: f"{task.hf_path} {split} row {i}")


def draw_shots(task, docs, pool, k, pool_name):
    """Few-shot examples per question, drawn as the harness draws them: one
    Random(1234) per harness task, used question after question in order."""
    need = k + 1 if task.shots_skip_question and k else k
    if len(pool) < need:
        extra = " (one more than k: the question itself is skipped)" if need > k else ""
        raise TaskError(f"{task.name}: {k} shots need {need} rows{extra}, but {pool_name} has {len(pool)}")
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
        raise TaskError(f"{task.name}: its {task.eval_split} split has no rows")
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


def fewshot_prefix(task, row, shots):
    # the header, then each shot solved and closed by the few-shot delimiter "\n\n"
    return task.header(row) + "".join(shot.solved() + "\n\n" for _, shot in shots)


def prompt_pairs(task, row, item, shots):
    prefix = fewshot_prefix(task, row, shots)
    return [(prefix + context, continuation) for context, continuation in item.pairs]
