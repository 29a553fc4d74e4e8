"""
Conversation data for the fine-tuning stages (sft.py, dpo.py, grpo.py): where the rows come
from and how they become token ids with a loss mask.

    chat_tokenizer(spec, ...)   a model's tokenizer, checked fit for the chat template
    rows(dataset)               -> (where, row) for 'pydoc' (offline demo), 'arithmetic' (the offline math demo),
                                a .jsonl file, or an HF dataset
    pydoc_conversations()       the offline demo: this interpreter's documentation as Q&A
    arithmetic_problems(split)  the offline math demo: seeded word problems with a \\boxed{} answer, for sft.py
                                and grpo.py; math_prompt(problem) is the user turn both ask it with
    load_conversations(...)     every conversation tokenized up front (tokenizer.encode_chat), with the
                                ones that have nothing to learn skipped and counted
    load_pairs(...)             preference pairs (Tulu 3's schema: 'chosen' and 'rejected' message lists
                                sharing all but the final response), or the offline pydoc_preferences()

Bad input raises trainer.UsageError naming the file and line (or row).
"""
import importlib
import inspect
import multiprocessing
import os
import random
import zlib

import numpy as np

from dataloader import ordered_map, read_jsonl
from tasks import MATH_INSTRUCTION
from tokenizer import Tokenizer, encode_chat
from trainer import UsageError


def chat_tokenizer(spec, args, block_size):
    """The tokenizer of a model (spec from its checkpoint) that a fine-tuning stage trains on chats
    of block_size tokens; UsageError if it cannot be one."""
    try:
        tokenizer = Tokenizer.load(spec)
    except ValueError as e:
        raise UsageError(f"the model's tokenizer: {e}") from None
    if tokenizer.eos_id is None:
        raise UsageError(f"tokenizer {tokenizer.spec} has no EOS token, which ends every reply in the chat template")
    if tokenizer.vocab_size > args.vocab_size:
        raise UsageError(f"tokenizer {tokenizer.spec} has {tokenizer.vocab_size} tokens, the model only {args.vocab_size}")
    if block_size > args.max_seq_len:
        raise UsageError(f"block_size={block_size} is larger than the model's max_seq_len={args.max_seq_len}")
    return tokenizer


def rows(dataset):
    """(where, row) for every row of the dataset; `where` names it in error messages ('file.jsonl:12')."""
    if dataset == 'pydoc':
        for n, messages in enumerate(pydoc_conversations()):
            yield f"pydoc conversation {n}", {'messages': messages}
    elif dataset in ('arithmetic', 'arithmetic:heldout'):
        split = 'heldout' if dataset.endswith(':heldout') else 'train'
        for n, row in enumerate(arithmetic_problems(split)):
            yield f"{dataset} problem {n}", row
    elif dataset.endswith('.jsonl'):
        if not os.path.isfile(dataset):
            raise UsageError(f"dataset={dataset}: no such file")
        try:
            for n, row in read_jsonl(dataset):
                yield f"{dataset}:{n}", row
        except ValueError as e:  # bad JSON or bad UTF-8, with file and line
            raise UsageError(str(e)) from None
    else:
        import datasets
        try:
            data = datasets.load_dataset(dataset, split='train')
        except Exception as e:  # offline, gated, misspelt: the library's messages run to many lines
            raise UsageError(f"cannot load dataset {dataset}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
        for n, row in enumerate(data):
            yield f"{dataset} row {n}", row


# The demo asks about these modules: they are pure Python or C with docstrings, and importing them does nothing
DOC_MODULES = ('builtins', 'math', 'cmath', 'string', 'json', 'itertools', 'functools', 'collections', 're',
               'random', 'statistics', 'textwrap', 'os', 'os.path', 'shutil', 'time', 'datetime', 'pathlib',
               'heapq', 'bisect', 'operator', 'fractions', 'decimal', 'copy', 'glob', 'fnmatch', 'base64', 'zlib')
QUESTIONS = ('What does {} do?', 'Explain {}.', 'What is {} for?', 'Tell me about {}.')


def pydoc_conversations():
    """The offline demo data, from the running interpreter's own documentation: each documented
    function and class (and each method of the built-in types) gives "What does math.sqrt do?" ->
    the first paragraph of its docstring, then, if it has a signature, "How do I call it?" ->
    "math.sqrt(x, /)"; each pydoc language topic gives "Explain the "assert" statement." -> its
    first paragraph. The phrasing is picked by a hash of the name, so the data never changes."""
    def answer(text):  # the first paragraph on one line; one that introduces an example ends with a period
        paragraph = ' '.join(text.strip().split('\n\n')[0].split())
        return paragraph[:-1] + '.' if paragraph.endswith(':') else paragraph

    def ask(subject):
        return QUESTIONS[zlib.crc32(subject.encode()) % len(QUESTIONS)].format(subject)

    seen = set()
    for module_name in DOC_MODULES:
        module = importlib.import_module(module_name)
        prefix = '' if module_name == 'builtins' else module_name + '.'
        for name, obj in sorted(vars(module).items()):
            if name.startswith('_'):
                continue
            members = [(name, obj)]
            if module_name == 'builtins' and isinstance(obj, type) and not issubclass(obj, BaseException):
                members += [(f"{name}.{m}", v) for m, v in sorted(vars(obj).items()) if not m.startswith('_')]
            for qualname, member in members:
                doc = inspect.getdoc(member) if callable(member) else None
                if not doc or id(member) in seen:
                    continue
                seen.add(id(member))
                messages = [{'role': 'user', 'content': ask(prefix + qualname)},
                            {'role': 'assistant', 'content': answer(doc)}]
                try:
                    signature = str(inspect.signature(member))
                except (TypeError, ValueError):  # many C functions publish no signature
                    signature = None
                # a default such as <function copy2 at 0x7f..> would make the data differ from run to run
                if signature and ' at 0x' not in signature:
                    messages += [{'role': 'user', 'content': 'How do I call it?'},
                                 {'role': 'assistant', 'content': f"{prefix}{qualname}{signature}"}]
                yield messages
    from pydoc_data.topics import topics
    for key in sorted(topics):
        title, underline, body = (topics[key].lstrip('\n').split('\n', 2) + ['', ''])[:3]
        if underline and set(underline) <= set('*=-') and body.strip():
            yield [{'role': 'user', 'content': f"Explain {title[0].lower() + title[1:]}."},
                   {'role': 'assistant', 'content': answer(body)}]


def math_prompt(problem):
    """The conversation a math problem is asked in: one user turn, the problem then the
    benchmark's MATH_INSTRUCTION (DeepScaleR's, tasks.MATH_INSTRUCTION), so a model is trained in the words the benchmark asks in."""
    return [{'role': 'user', 'content': f"{problem} {MATH_INSTRUCTION}"}]


ARITHMETIC_SIZES = {'train': 800, 'heldout': 200}  # 800 x 6 epochs / 16 = sft.py's 300 demo steps
NAMES = {'train': ('Ada', 'Ben', 'Cleo', 'Dan', 'Eva', 'Finn', 'Gus', 'Hana', 'Ivo'), 'heldout': ('Jade', 'Kai', 'Lena')}
THINGS = ('apples', 'books', 'coins', 'marbles', 'pens', 'shells', 'stamps', 'cards', 'eggs', 'stones')


def arithmetic_problems(split):
    """The offline math demo: one-digit word problems ("Ada has 7 pens and gets 5 more. How many pens
    does Ada have now?") with a one-line worked solution ending in \\boxed{12}, as rows
    {problem, answer, messages}: grpo.py reads problem/answer (DeepScaleR's schema), sft.py the
    conversation. The calculations are the 226 one-digit facts: a + b and a x b of digits (1-9; 2-9 for
    products), and (a + b) - b. Problem n of a split is drawn by random.Random(f"{split}{n}"), so the
    data never changes. The 'heldout' problems are about people no 'train' problem names: the same
    facts, asked in sentences never trained on."""
    for n in range(ARITHMETIC_SIZES[split]):
        rng = random.Random(f"{split}{n}")
        name, things, kind = rng.choice(NAMES[split]), rng.choice(THINGS), rng.choice('+-*')
        if kind == '+':
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            problem = f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?"
        elif kind == '-':
            b, c = rng.randint(1, 9), rng.randint(1, 9)
            a = b + c
            problem = f"{name} has {a} {things} and gives away {b}. How many {things} does {name} have left?"
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            problem = f"{name} has {a} bags with {b} {things} in each. How many {things} does {name} have?"
        answer = str({'+': a + b, '-': a - b, '*': a * b}[kind])
        solution = f"{a} {kind.replace('*', 'x')} {b} = {answer}. The answer is \\boxed{{{answer}}}."
        yield {'problem': problem, 'answer': answer,
               'messages': math_prompt(problem) + [{'role': 'assistant', 'content': solution}]}


def encode_row(tokenizer, where, row, block_size):
    """-> (ids, mask, has_reply) of one dataset row: int32/bool arrays of at most block_size + 1 tokens
    (inputs and targets of block_size positions), and whether it has an assistant turn at all.
    Raises UsageError, naming the row, on anything that is not a conversation."""
    if not isinstance(row, dict) or 'messages' not in row:
        raise UsageError(f"{where}: no 'messages' field")
    messages = row['messages']
    if not isinstance(messages, list):
        raise UsageError(f"{where}: 'messages' is {type(messages).__name__}, not a list")
    try:
        ids, mask = encode_chat(tokenizer, messages, block_size + 1)
    except ValueError as e:  # an unknown role, a content that is not a string
        raise UsageError(f"{where}: {e}") from None
    has_reply = any(m['role'] == 'assistant' for m in messages)
    return np.array(ids, dtype=np.int32), np.array(mask, dtype=bool), has_reply


_worker_tokenizer = None  # each tokenizing process loads its own


def _start_worker(spec):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(spec)


def _encode_in_worker(item):
    encode, *args = item
    return encode(_worker_tokenizer, *args)


def encode_rows(encode, items, tokenizer, workers):
    """encode(tokenizer, *item) for every item, in order; in `workers` processes when more than one,
    forked (on Linux) like torch's DataLoader workers: they start at once and never touch the GPU.
    encode must be a module-level function."""
    if workers <= 1:
        yield from (encode(tokenizer, *item) for item in items)
        return
    pool = multiprocessing.Pool(workers, _start_worker, (tokenizer.spec,))
    try:
        yield from ordered_map(pool, _encode_in_worker, ((encode, *item) for item in items))
    finally:
        pool.terminate()


def load_conversations(dataset, tokenizer, block_size, workers):
    """Read and tokenize every conversation up front, as open-instruct does: bad input stops the
    run before anything is written, and the number of conversations fixes the number of steps.
    -> (ids, mask, offsets, skipped): conversation i is ids[offsets[i]:offsets[i + 1]]."""
    items = ((where, row, block_size) for where, row in rows(dataset))
    kept_ids, kept_mask = [], []
    skipped = {'no assistant turn': 0, 'no reply within block_size': 0}
    for ids, mask, has_reply in encode_rows(encode_row, items, tokenizer, workers):
        if not has_reply:
            skipped['no assistant turn'] += 1
        elif not mask.any():  # the conversation is cut before its first reply: nothing to learn
            skipped['no reply within block_size'] += 1
        else:
            kept_ids.append(ids)
            kept_mask.append(mask)
    if not kept_ids:
        raise UsageError(f"dataset={dataset}: no conversation to train on ({describe_skipped(skipped)})")
    offsets = np.cumsum([0] + [len(ids) for ids in kept_ids])
    return np.concatenate(kept_ids), np.concatenate(kept_mask), offsets, skipped


def describe_skipped(skipped):
    return ', '.join(f"{n:,} skipped: {why}" for why, n in skipped.items())



# ----------------------------------------------------------------------------- preference pairs (dpo.py)

def pydoc_preferences(seed):
    """The offline demo's preference pairs, (where, row) in the Tulu 3 schema: the first exchange of
    each pydoc conversation, chosen = its own documentation answer, rejected = the answer about
    another object, drawn with the seed (never the same text: some objects share a docstring)."""
    exchanges = [messages[:2] for messages in pydoc_conversations()]
    rng = np.random.default_rng(seed)
    for n, (question, answer) in enumerate(exchanges):
        other = answer
        while other['content'] == answer['content']:
            other = exchanges[(n + rng.integers(1, len(exchanges))) % len(exchanges)][1]
        yield f"pydoc pair {n}", {'chosen': [question, answer], 'rejected': [question, other]}


def encode_pair(tokenizer, where, row, block_size):
    """-> (chosen ids, chosen mask, rejected ids, rejected mask) of a preference row, int32/bool arrays,
    or None when either conversation is longer than block_size + 1 tokens (block_size positions).
    Each is the shared prompt (every message but the last, rendered by encode_chat) followed by its
    final assistant reply and EOS, and the mask marks that reply and EOS only: earlier assistant
    turns belong to the prompt. Raises UsageError, naming the row, on anything that is not a pair."""
    if not isinstance(row, dict) or 'chosen' not in row or 'rejected' not in row:
        raise UsageError(f"{where}: a preference pair needs 'chosen' and 'rejected' fields, this row has "
                         f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
    encoded = []
    for side in ('chosen', 'rejected'):
        messages = row[side]
        if not isinstance(messages, list) or not messages:
            raise UsageError(f"{where}: '{side}' is not a list of messages")
        try:
            ids, mask = encode_chat(tokenizer, messages)
        except ValueError as e:  # an unknown role, a content that is not a string
            raise UsageError(f"{where}: '{side}' {e}") from None
        if messages[-1]['role'] != 'assistant':
            raise UsageError(f"{where}: '{side}' ends with a {messages[-1]['role']} message, not the assistant's response")
        if not messages[-1]['content'].strip():
            raise UsageError(f"{where}: the '{side}' response is empty")
        encoded.append((ids, mask))
    prompts = [[(m['role'], m['content']) for m in row[side][:-1]] for side in ('chosen', 'rejected')]
    if prompts[0] != prompts[1]:
        n = next((n for n, (a, b) in enumerate(zip(*prompts)) if a != b), min(map(len, prompts)))
        raise UsageError(f"{where}: 'chosen' and 'rejected' differ at message {n}: the two conversations of a pair "
                         f"share every message but the final response")
    prompt_len = len(encode_chat(tokenizer, row['chosen'][:-1], add_generation_prompt=True)[0])
    pair = []
    for ids, mask in encoded:
        end = len(mask) - mask[::-1].index(1)  # just after the final reply's EOS
        if end > block_size + 1:
            return None
        pair += [np.array(ids[:end], dtype=np.int32), np.array([0] * prompt_len + mask[prompt_len:end], dtype=bool)]
    return tuple(pair)


def load_pairs(dataset, tokenizer, block_size, workers, seed):
    """Read and tokenize every preference pair up front ('pydoc' = pydoc_preferences(seed), else a
    .jsonl file or HF dataset read by rows()). -> (ids, mask, offsets, skipped): pair i's chosen
    conversation is sequence 2i, ids[offsets[2i]:offsets[2i + 1]], its rejected one sequence 2i + 1."""
    source = pydoc_preferences(seed) if dataset == 'pydoc' else rows(dataset)
    items = ((where, row, block_size) for where, row in source)
    sequences, skipped = [], {'longer than block_size': 0}
    for pair in encode_rows(encode_pair, items, tokenizer, workers):
        if pair is None:
            skipped['longer than block_size'] += 1
        else:
            sequences += [pair[:2], pair[2:]]
    if not sequences:
        raise UsageError(f"dataset={dataset}: no preference pair to train on ({describe_skipped(skipped)})")
    offsets = np.cumsum([0] + [len(ids) for ids, _ in sequences])
    return (np.concatenate([ids for ids, _ in sequences]), np.concatenate([mask for _, mask in sequences]),
            offsets, skipped)
