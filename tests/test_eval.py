"""eval.py: per-item log-likelihoods and answers equal lm-evaluation-harness's (HFLM on the
same random-weight HF Mistral and the same small task files), prompts equal hand-written
strings, the KV-cache sharing equals plain forward passes, and bad input fails in one line."""
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import eval as ev
import tasks
from tokenizer import Tokenizer
from model import KVCache, Transformer, model_args
from weights import export_hf, load_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "fixtures" / "eval"
SPM = str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1")
SHOTS = {"arc_easy": 3, "arc_challenge": 2, "hellaswag": 2, "piqa": 3, "winogrande": 3, "mmlu": 5}
CASES = [(task, k) for task in SHOTS for k in (0, SHOTS[task])]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Random-weight Mistral with the real 32k tokenizer, a window of 32 (shorter than most
    prompts) and a context of 320 (one MMLU 5-shot prompt is longer: left truncation)."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=32,
                                     max_position_embeddings=320)
    transformers.MistralForCausalLM(cfg).save_pretrained(path)
    # a tokenizer.json converted from Mistral's SentencePiece model, adding BOS as Mistral's does
    spm_dir = tmp_path_factory.mktemp("spm")
    shutil.copy(SPM, spm_dir / "tokenizer.model")
    (spm_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    transformers.AutoTokenizer.from_pretrained(spm_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours(hf_dir):
    model, spec = load_model(str(hf_dir))
    return model, Tokenizer.load(spec)


def harness_task(cfg, splits, k):
    datasets = pytest.importorskip("datasets")
    from lm_eval.api.task import ConfigurableTask

    # the task's own YAML config, its documents served from our rows instead of the hub
    tables = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
    return ConfigurableTask(config={**cfg, "custom_dataset": lambda **_: tables, "num_fewshot": k})


@pytest.fixture(scope="module")
def harness(hf_dir):
    """{(task, k): {unit: per document (prompts, log-likelihoods)}} from lm-evaluation-harness."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # HFLM needs it
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_dir = Path(lm_eval.__file__).parent / "tasks"
    yamls = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
             "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml"}
    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8)
    out = {}
    for shots in ({task: 0 for task in SHOTS}, SHOTS):
        tasks = {}
        for task, k in shots.items():
            splits = {f.stem: [json.loads(line) for line in f.open()] for f in (DATA / task).glob("*.jsonl")}
            if task != "mmlu":
                tasks[task] = harness_task(load_yaml(yaml_dir / yamls[task], resolve_func=True), splits, k)
                continue
            for subject in dict.fromkeys(row["subject"] for row in splits["test"]):
                cfg = load_yaml(yaml_dir / f"mmlu/default/mmlu_{subject}.yaml", resolve_func=True)
                by_subject = {name: [r for r in rows if r["subject"] == subject] for name, rows in splits.items()}
                tasks[f"mmlu_{subject}"] = harness_task(cfg, by_subject, k)
        result = evaluator.simple_evaluate(model=lm, tasks=list(tasks.values()), log_samples=True,
                                           task_manager=TaskManager(include_defaults=False))
        for name, samples in result["samples"].items():
            task = "mmlu" if name.startswith("mmlu_") else name
            docs = sorted(samples, key=lambda s: s["doc_id"])
            out.setdefault((task, shots[task]), {})[name.removeprefix("mmlu_")] = [
                ([tuple(a) for a in s["arguments"]], [r[0] for r in s["filtered_resps"]]) for s in docs]
    return out


@pytest.mark.parametrize("task, k", CASES)
def test_loglikelihoods_and_answers_match_harness(ours, harness, task, k):
    model, tokenizer = ours
    result = ev.evaluate(model, tokenizer, task, k, data_dir=str(DATA), batch_size=4)
    expected = [lls for unit in harness[task, k].values() for _, lls in unit]
    docs = [doc for _, unit in tasks.load_units(tasks.TASKS[task], k, str(DATA), None) for doc in unit]
    assert len(result["items"]) == len(expected) == len(docs)
    for ours_item, lls, (_, item, _) in zip(result["items"], expected, docs):
        assert len(ours_item["lls"]) == len(lls)
        assert max(abs(a - b) for a, b in zip(ours_item["lls"], lls)) < 1e-4
        # the same answer, so acc and acc_norm are equal
        assert ours_item["pred"] == ev.argmax(lls)
        assert ours_item["pred_norm"] == ev.argmax([ll / len(c) for ll, c in zip(lls, item.choices)])


@pytest.mark.parametrize("task, k", CASES)
def test_prompts_match_harness(harness, task, k):
    """Shots drawn with the harness's seed and sampler, prompt text to the character."""
    for unit, docs in tasks.load_units(tasks.TASKS[task], k, str(DATA), None):
        ours = [tasks.prompt_pairs(tasks.TASKS[task], *doc) for doc in docs]
        assert ours == [args for args, _ in harness[task, k][unit]]


def prompts(task, k=0, index=0):
    units = tasks.load_units(tasks.TASKS[task], k, str(DATA), None)
    return tasks.prompt_pairs(tasks.TASKS[task], *units[0][1][index])


def test_known_prompts():
    assert prompts("hellaswag", index=2) == [
        ("Home and Garden: How to grow tomatoes in pots. Choose a large container. Tomato plants need room for "
         "their roots. Pick a pot that",
         " holds at least five gallons of soil. Plastic pots keep the soil moist longer."),
        ("Home and Garden: How to grow tomatoes in pots. Choose a large container. Tomato plants need room for "
         "their roots. Pick a pot that", " is painted bright red."),
        ("Home and Garden: How to grow tomatoes in pots. Choose a large container. Tomato plants need room for "
         "their roots. Pick a pot that", " has no holes at all. Fill it with sand."),
        ("Home and Garden: How to grow tomatoes in pots. Choose a large container. Tomato plants need room for "
         "their roots. Pick a pot that", " fits in your freezer.")]
    # "[title]" at the very start has no space before it: the tag is dropped, its space stays
    context, continuation = prompts("hellaswag", index=3)[0]
    assert context == "Personal Care and Style:. How to braid your hair Brush your hair until it is smooth."
    assert continuation == "  Divide it into three equal sections."
    assert prompts("winogrande") == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")]
    assert prompts("arc_easy", index=1) == [
        ("Question: A student puts a metal spoon into hot soup. Soon the handle of the spoon feels hot. "
         "How did the heat move?\nAnswer:", " " + c) for c in ("by conduction", "by convection", "by radiation")]
    assert prompts("piqa", index=2)[1] == (
        "Question: To make a hard boiled egg easy to peel,\nAnswer:", " put it in the microwave right after boiling.")
    assert prompts("mmlu", k=2, index=2)[3] == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K "
        "are subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: B\n\n"
        "What is the order of the element 3 in Z_7 under addition?\nA. 1\nB. 3\nC. 6\nD. 7\nAnswer:", " D")


def test_render_examples():
    rows = [json.loads(line) for line in (DATA / "winogrande" / "train.jsonl").open()][:2]
    assert tasks.render_examples("winogrande", rows) == [
        "Ian volunteered to eat Dennis's menudo after already having a bowl because Ian enjoyed eating intestine.",
        "He never comes to my home, but I always go to his house because the home is smaller."]
    row = {"question": "Water boils at", "subject": "high_school_physics", "choices": ["0 C", "50 C", "100 C", "1 C"],
           "answer": 2}
    assert tasks.render_examples("mmlu", [row]) == [
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Water boils at\nA. 0 C\nB. 50 C\nC. 100 C\nD. 1 C\nAnswer: C"]
    with pytest.raises(tasks.TaskError, match="piqa row 0: missing field 'sol2'"):
        tasks.render_examples("piqa", [{"goal": "g", "sol1": "a", "label": 0}])


@pytest.mark.concept
def test_fast_scorer_equals_reference():
    """Shared prefix, contexts of different lengths batched together, fanned-out continuations
    (some sharing their first tokens), one-token answers that need no cache past the context,
    with a window of 8 (rows roll around the cache) and without one: every log-likelihood
    equals score_reference's one forward pass per request."""
    for window in (8, None):
        torch.manual_seed(0)
        model = Transformer(model_args("tiny", sliding_window=window))
        model.init_weights()
        model.eval()
        check_fast_scorer(model)


def check_fast_scorer(model):
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(3, 256, (n,), generator=g).tolist()
    prefix = rand(20)
    questions = []
    for length in (5, 9, 5, 5, 12, 9, 30):
        context, common = prefix + rand(length), rand(2)
        questions.append([(context + common + tail[:-1], common + tail) for tail in (rand(3), rand(1), rand(6))])
    for length in (4, 7):  # MMLU-like: one-token answers read at the context's last position
        context = prefix + rand(length)
        questions.append([(context, [t]) for t in rand(4)])
    questions.append([(prefix[:10] + rand(4), rand(2))])  # a question that shares only part of the prefix
    expected = [ev.score_reference(model, q) for q in questions]
    for batch_size in (1, 3, 5, 16):
        scores = ev.score_cached(model, questions, batch_size, ev.tqdm(disable=True))
        assert max(abs(a - b) for lls, ref in zip(scores, expected) for a, b in zip(lls, ref)) < 1e-4


@pytest.mark.parametrize("window", [8, None])
@torch.no_grad()
def test_ragged_rows_equal_each_row_alone(window):
    """ragged_hidden: rows of different lengths, continuing a cache's rows at different positions
    (past the window of 8 in the second call), give each row's hidden states as model.hidden
    gives that row alone; the padding never enters the cache, or the second call would read it."""
    torch.manual_seed(0)
    model = Transformer(model_args("tiny", sliding_window=window))
    model.init_weights()
    model.eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (13, 5, 1, 20)]
    more = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 6, 1)]
    alone = torch.cat([model.hidden(torch.tensor([r]))[0] for r in rows])
    alone_more = torch.cat([model.hidden(torch.tensor([r + m]))[0, len(r):] for r, m in zip(rows, more)])
    # a cache that holds every row whole, as score_cached's
    cache = KVCache(replace(model.args, sliding_window=None, max_seq_len=32), len(rows), "cpu", torch.float32)
    assert (ev.ragged_hidden(model, rows, cache) - alone).abs().max().item() < 1e-5
    assert cache.pos == [13, 5, 1, 20]
    assert (ev.ragged_hidden(model, more, cache) - alone_more).abs().max().item() < 1e-5


def test_command_line_writes_table_and_json(hf_dir, tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--ckpt", str(hf_dir), "--tasks", "piqa,mmlu",
                             "--num_fewshot", "1", "--limit", "2", "--data_dir", str(DATA), "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "piqa" in result.stdout and "acc_norm" in result.stdout
    results = json.loads(out.read_text())["results"]
    assert results["piqa"]["n"] == 2 and results["piqa"]["num_fewshot"] == 1
    assert results["mmlu"]["n"] == 6 and set(results["mmlu"]["subjects"]) == {
        "abstract_algebra", "college_biology", "high_school_us_history"}


def write_task(root, task, split, rows):
    (root / task).mkdir(parents=True, exist_ok=True)
    (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc_easy,squad"], "unknown task 'squad' (known: arc_easy, arc_challenge, hellaswag, piqa, "
                                    "winogrande, mmlu, gsm8k, math500)"),
    # the default limit of math500 (4096) is beyond this model's context of 320
    (["--tasks", "math500"], "math500: a generation limit of 4096 tokens leaves no room for a prompt in the model's "
                             "context of 320 (set --max_gen_toks below it)"),
    (["--tasks", "gsm8k", "--max_gen_toks", "320"], "gsm8k: a generation limit of 320 tokens leaves no room for a "
                                                    "prompt in the model's context of 320 (set --max_gen_toks below it)"),
    (["--tasks", "math500", "--num_fewshot", "2"], "math500 is zero-shot: it has no split to draw shots from"),
    (["--tasks", "gsm8k", "--samples", "4"], "--samples > 1 needs --temperature > 0: greedy completions are all the same"),
    (["--tasks", "piqa", "--chat"], "--chat applies to generative tasks, and piqa is multiple choice"),
    (["--tasks", "gsm8k", "--log_samples"], "--log_samples writes into --out: give --out FILE.json"),
    (["--tasks", "piqa", "--suite", "moxin_zeroshot"], "give either --tasks or --suite"),
    (["--suite", "moxin"], f"unknown suite 'moxin' (known: {', '.join(tasks.SUITES)})"),
    (["--tasks", "piqa", "--limit", "0"], "--limit must be a positive integer, got 0"),
    (["--tasks", "piqa", "--num_fewshot", "two"], "--num_fewshot must be an integer >= 0, got 'two'"),
    (["--tasks", "piqa", "--temprature", "1"], "unknown config key '--temprature' (did you mean --temperature?)"),
    (["--tasks", "gsm8k", "--top_p", "0"], "--top_p must be in (0, 1] (1 = off), got 0.0"),
    (["--tasks", "hellaswag", "--num_fewshot", "4"], "hellaswag: 4 shots need 5 rows (one more than k: the question "
                                                     "itself is skipped), but its train split has 4"),
    (["--tasks", "mmlu", "--num_fewshot", "6"], "mmlu: 6 shots need 6 rows, but subject abstract_algebra of its "
                                                "dev split has 5"),
])
def test_bad_arguments(hf_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--ckpt", str(hf_dir), "--data_dir", str(DATA), *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_config_file_and_overrides(hf_dir, tmp_path):
    """A config file sets eval.py's settings as it does a training stage's; --key value overrides it."""
    config = tmp_path / "piqa_quick.py"
    config.write_text(f"tasks = 'piqa'\nlimit = 3\ndata_dir = {str(DATA)!r}\n")
    out = tmp_path / "results.json"
    ev.main([str(config), "--ckpt", str(hf_dir), "--limit", "2", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["piqa"] and results["piqa"]["n"] == 2


def test_bad_data_dir(hf_dir, tmp_path, capsys):
    def fails(data_dir, task, message, *extra):
        with pytest.raises(SystemExit):
            ev.main(["--ckpt", str(hf_dir), "--tasks", task, "--data_dir", str(data_dir), *extra])
        assert capsys.readouterr().err == f"error: {message}\n"

    fails(tmp_path, "arc_easy", f"{tmp_path}/arc_easy/test.jsonl not found: --data_dir needs arc_easy/test.jsonl")
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g", "sol1": "a", "label": 1}]
    write_task(tmp_path, "piqa", "validation", rows)
    fails(tmp_path, "piqa", f"{tmp_path}/piqa/validation.jsonl line 2: missing field 'sol2'")
    (tmp_path / "piqa" / "validation.jsonl").write_text('{"goal": "g"\n')
    fails(tmp_path, "piqa", f"{tmp_path}/piqa/validation.jsonl line 1: not JSON (Expecting ',' delimiter)")
    write_task(tmp_path, "winogrande", "validation", [{"sentence": "no blank", "option1": "a", "option2": "b",
                                                       "answer": "1"}])
    fails(tmp_path, "winogrande", f"{tmp_path}/winogrande/validation.jsonl line 1: cannot render this winogrande "
                                  "row (ValueError: substring not found)")
    write_task(tmp_path, "gsm8k", "test", [{"question": "How many?", "answer": "#### 2"}, {"question": "And now?"}])
    fails(tmp_path, "gsm8k", f"{tmp_path}/gsm8k/test.jsonl line 2: missing field 'answer'")
    write_task(tmp_path, "math500", "test", [{"question": "What is 1 + 1?", "answer": "2"}])
    fails(tmp_path, "math500", f"{tmp_path}/math500/test.jsonl line 1: missing field 'problem'", "--max_gen_toks", "64")


# ----------------------------------------------------------------------------- generative tasks

def train_gsm8k_model(path, steps=100):
    """A tiny Mistral that has learnt the gsm8k fixture's format for a few seconds, so that its
    greedy answers look like worked solutions, end with "#### N" and go on into the next
    "Question:", where generation must stop. Its byte-level BPE tokenizer (400 tokens, trained
    on the same text) keeps the output head small; both are saved as an HF model directory."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    rows = [json.loads(line) for line in (DATA / "gsm8k" / "train.jsonl").open()]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "clean_up_tokenization_spaces": False}))
    torch.manual_seed(0)
    # a window of 32, well inside the ~300-token prompts; trained on 32-token windows, where it is plain causal
    model = Transformer(model_args("tiny", vocab_size=tok.get_vocab_size(), sliding_window=32, max_seq_len=1024))
    model.init_weights()
    g = torch.Generator().manual_seed(0)
    stream = torch.tensor([t for i in range(30) for t in tok.encode(
        "".join(texts[j] for j in torch.randperm(len(texts), generator=g))).ids])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 33, (16,), generator=g)
        batch = torch.stack([stream[s:s + 33] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    export_hf(model.eval(), path, dtype=torch.float32)
    return loss.item()


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("gsm8k_model")
    assert train_gsm8k_model(path) < 1.0
    return path


# Moxin's (Tulu's) chat template, tokenizer.encode_chat's format, as a transformers chat template
TULU_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def harness_gsm8k(model_dir, chat):
    """Per test document lm-evaluation-harness's (generated text, {filter: (answer, exact_match)})."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml", resolve_func=True)
    splits = {f.stem: [json.loads(line) for line in f.open()] for f in (DATA / "gsm8k").glob("*.jsonl")}
    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=1, dtype=torch.float32)
    result = evaluator.simple_evaluate(model=lm, tasks=[harness_task(cfg, splits, 5)], log_samples=True,
                                       apply_chat_template=chat, task_manager=TaskManager(include_defaults=False))
    out = {}
    for s in result["samples"]["gsm8k"]:
        text, answers = out.setdefault(s["doc_id"], (s["resps"][0][0], {}))
        assert s["resps"][0][0] == text
        answers[s["filter"]] = (s["filtered_resps"][0], s["exact_match"])
    return [out[i] for i in sorted(out)]


@pytest.mark.parametrize("chat", [False, True])
def test_gsm8k_matches_harness(gsm8k_dir, tmp_path, chat):
    """The same prompts, the same greedy text cut at the same stop string, the same answers from
    both filters and the same exact_match verdicts as lm-eval 0.4.13's HFLM, item by item; with
    --chat as with the harness's --apply_chat_template (the whole prompt as one user turn)."""
    if chat:
        shutil.copytree(gsm8k_dir, tmp_path / "chat")
        gsm8k_dir = tmp_path / "chat"
        config = json.loads((gsm8k_dir / "tokenizer_config.json").read_text())
        (gsm8k_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TULU_TEMPLATE}))
    model, spec = load_model(str(gsm8k_dir))
    result = ev.evaluate(model, Tokenizer.load(spec), "gsm8k", data_dir=str(DATA), batch_size=4,
                         gen=ev.Generation(chat=chat))
    expected = harness_gsm8k(gsm8k_dir, chat)
    assert len(result["items"]) == len(expected) == 6
    for item, (text, answers) in zip(result["items"], expected):
        completion = item["completions"][0]
        assert completion["text"] == text
        for name in ("strict-match", "flexible-extract"):
            assert (completion["extracted"][name], completion["scores"][f"exact_match,{name}"]) == answers[name]
    if chat:  # the model has never seen the chat tags: its answers are whatever they are
        return
    stopped = [item["completions"][0]["stopped_by"] for item in result["items"]]
    assert "Question:" in stopped  # the stop sequence is exercised
    verdicts = [item["scores"]["exact_match,strict-match"] for item in result["items"]]
    assert 0 < sum(verdicts) < len(verdicts)  # right and wrong answers both occur
    assert result["metrics"]["exact_match,strict-match"] == sum(verdicts) / len(verdicts)


def test_generative_command_line_logs_samples(gsm8k_dir, tmp_path, capsys):
    out = tmp_path / "gen.json"
    ev.main(["--ckpt", str(gsm8k_dir), "--tasks", "gsm8k,math500", "--limit", "2", "--max_gen_toks", "24",
             "--data_dir", str(DATA), "--out", str(out), "--log_samples"])
    assert "exact_match,flexible-extract" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["results"]["gsm8k"]["n"] == 2 and written["results"]["gsm8k"]["num_fewshot"] == 5
    assert written["results"]["math500"]["num_fewshot"] == 0
    gsm8k, math500 = written["samples"]["gsm8k"], written["samples"]["math500"]
    assert gsm8k[0]["prompt"].startswith("Question: ") and gsm8k[0]["prompt"].endswith(
        "Question: Ben has 7 bags with 6 marbles in each bag. How many marbles does he have?\nAnswer:")
    assert gsm8k[0]["gold"].endswith("#### 42")
    completion = gsm8k[0]["completions"][0]
    assert set(completion["extracted"]) == {"strict-match", "flexible-extract"}
    assert completion["stopped_by"] in ("Question:", "</s>", "<|im_end|>", "eos", "max_gen_toks")
    assert math500[1]["prompt"] == ("Solve $2x + 3 = 11$ for $x$. Let's think step by step and output the final "
                                    "answer within \\boxed{}.")
    assert math500[1]["gold"] == "4" and "boxed" in math500[1]["completions"][0]["extracted"]


def test_sampling_averages_over_samples(gsm8k_dir, one_thread):
    model, spec = load_model(str(gsm8k_dir))
    tokenizer = Tokenizer.load(spec)
    gen = ev.Generation(max_gen_toks=16, samples=3, temperature=1.0, seed=1)
    run = lambda: ev.evaluate(model, tokenizer, "gsm8k", data_dir=str(DATA), limit=2, gen=gen)
    first, again = run(), run()
    for item in first["items"]:
        texts = [c["text"] for c in item["completions"]]
        assert len(texts) == 3 and len(set(texts)) > 1  # sampled, not greedy
        for metric, score in item["scores"].items():
            assert score == sum(c["scores"][metric] for c in item["completions"]) / 3
    assert first["items"] == again["items"]  # the seed fixes the samples


def test_torchrun_ranks_each_score_a_share_and_merge_to_the_one_process_result(hf_dir, tmp_path):
    """Under torchrun each rank scores every world_size-th question (MMLU: of each subject) and the
    merged result is the one process's: every metric and every logged item, sampled completions
    included (each completion draws from its own generator: seed, problem, sample), log-likelihoods
    to float precision (a rank's questions share their common prefix in other groupings)."""
    runs = [(hf_dir, ["--tasks", "piqa,mmlu,gsm8k", "--num_fewshot", "1", "--limit", "3", "--max_gen_toks", "12",
                      "--samples", "2", "--temperature", "1.0"])]  # one run: each launch costs seconds of imports
    for model_dir, args in runs:
        written = []
        for launcher in ([sys.executable, "eval.py"],
                         [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval.py"]):
            out = tmp_path / f"{len(written)}.json"
            done = subprocess.run([*launcher, "--ckpt", str(model_dir), *args, "--data_dir", str(DATA), "--out", str(out),
                                   "--log_samples"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert done.returncode == 0, done.stderr[-2000:]
            written.append(json.loads(out.read_text()))
        for result in (w["results"] for w in written):
            for metrics in result.values():
                metrics.pop("seconds"), metrics.pop("items_per_s")
        assert written[0]["results"] == written[1]["results"]
        assert all(m["n"] == 3 or name == "mmlu" for name, m in written[0]["results"].items())
        assert {"piqa", "gsm8k"} <= set(written[0]["samples"]) and len(written[0]["samples"]["gsm8k"]) == 3
        for task, items in written[0]["samples"].items():
            merged = written[1]["samples"][task]
            assert len(items) == len(merged)
            for one, two in zip(items, merged):  # log-likelihoods to float precision: a rank shares its prefixes
                if "lls" in one:
                    assert one.pop("lls") == pytest.approx(two.pop("lls"), rel=1e-5)
                assert one == two
