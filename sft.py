"""
Supervised fine-tuning (SFT): teach a pre-trained model to chat.

    python sft.py                                          # the demo: out/final.pt on this Python's docs as Q&A
    python sft.py --dataset=chats.jsonl --init_from=path/to/hf_model
    torchrun --nproc_per_node=8 sft.py config/sft_tulu3.py    # Moxin-7B instruct, FSDP2

Each conversation is rendered in Moxin's (Tulu's) chat template by tokenizer.encode_chat,
    <|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n...</s>\\n
and the loss is computed on the assistant replies and the EOS closing each of them only: the
model learns to answer, and to stop, not to imitate the user. Everything else is pretrain.py's:
the model build, FSDP2, precision, AdamW, checkpoints, resume, logging and fault handling are
its functions, and its train_loop is this script's loop; only the batches and the schedule differ.

Data (`dataset`):
    'pydoc'                         offline: questions about this interpreter's functions, classes
                                    and language topics, answered with their documentation
    a path ending in .jsonl         one conversation per line: {"messages": [{"role": ..., "content": ...}, ...]}
    anything else                   a Hugging Face dataset with a 'messages' column, e.g.
                                    allenai/tulu-v2-sft-mixture or allenai/tulu-3-sft-mixture

Bad input: a row without 'messages', a message with a role other than system/user/assistant
(the data is in another schema, e.g. ShareGPT's human/gpt, and must be converted: training on a
guess would be worse than stopping), or invalid JSON stops the run before anything is written,
naming the file and line. A conversation with no assistant turn has nothing to learn from; it
is skipped and counted, as is one whose first reply starts beyond block_size.

What ends up in out_dir: as for pretrain.py, checkpoints/, log.jsonl and final.pt, which
`python sample.py --ckpt out/sft/final.pt --chat` talks to.
"""
import importlib
import inspect
import math
import multiprocessing
import os
import time
import zlib
from dataclasses import asdict

import numpy as np

from configurator import settings
from data import ordered_map, read_jsonl
from dataloader import ChatLoader
from model import ModelArgs
from tokenizer import Tokenizer, encode_chat
from trainer import (Run, UsageError, build_model, build_optimizer, checkpoint_meta, describe_model, find_checkpoint,
                     launch, lm_loss, lr_at, read_init_weights, train_step)

# ----------------------------------------------------------------------------- defaults (= the demo)
init_from = 'out/final.pt'     # the model to fine-tune: a .pt checkpoint of this project or an HF model dir
dataset = 'pydoc'              # 'pydoc', a .jsonl file, or a Hugging Face dataset name (see above)
block_size = 256               # tokens per conversation; longer ones are cut (their tail is not trained on)
# batch: one optimizer step sees batch_size * grad_accum * world_size conversations
batch_size = 8                 # conversations per micro-batch per rank
grad_accum = 2
loss_reduction = 'mean'        # 'mean': each micro-batch's mean over its trained tokens weighs the same;
                               # 'sum': every trained token of the step weighs the same (open-instruct's
                               # --reduce_loss sum), normalised by the step's trained tokens over all ranks
epochs = 6                     # passes over the data; sets the number of steps
# optimizer and schedule: linear warmup, then linear decay to 0 (open-instruct's SFT schedule)
lr = 2e-3                       # small models take large learning rates
warmup_ratio = 0.03            # of all steps
weight_decay = 0.0
betas = (0.9, 0.95)
eps = 1e-8
grad_clip = 1.0
seed = 1337
# speed / memory
compile = False
activation_checkpointing = False
# output
out_dir = 'out/sft'
resume = 'auto'                # 'auto' = newest complete checkpoint in out_dir, if any; or a checkpoint dir
ckpt_interval = 100
keep_last = 2
log_interval = 10
export_hf = False              # also write {out_dir}/hf, an HF MistralForCausalLM directory
workers = 1                    # processes (per rank) that tokenize the data; the Tulu mixtures want many
config_keys = settings(globals())


# ----------------------------------------------------------------------------- conversations

def rows(dataset):
    """(where, row) for every row of the dataset; `where` names it in error messages ('file.jsonl:12')."""
    if dataset == 'pydoc':
        for n, messages in enumerate(pydoc_conversations()):
            yield f"pydoc conversation {n}", {'messages': messages}
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
    return encode_row(_worker_tokenizer, *item)


def load_conversations(dataset, tokenizer, block_size, workers):
    """Read and tokenize every conversation up front, as open-instruct does: bad input stops the
    run before anything is written, and the number of conversations fixes the number of steps.
    -> (ids, mask, offsets, skipped): conversation i is ids[offsets[i]:offsets[i + 1]]."""
    items = ((where, row, block_size) for where, row in rows(dataset))
    if workers > 1:
        # forked (on Linux) like torch's DataLoader workers: they start at once and never touch the GPU
        pool = multiprocessing.Pool(workers, _start_worker, (tokenizer.spec,))
        encoded = ordered_map(pool, _encode_in_worker, items)
    else:
        pool, encoded = None, (encode_row(tokenizer, *item) for item in items)
    kept_ids, kept_mask = [], []
    skipped = {'no assistant turn': 0, 'no reply within block_size': 0}
    try:
        for ids, mask, has_reply in encoded:
            if not has_reply:
                skipped['no assistant turn'] += 1
            elif not mask.any():  # the conversation is cut before its first reply: nothing to learn
                skipped['no reply within block_size'] += 1
            else:
                kept_ids.append(ids)
                kept_mask.append(mask)
    finally:
        if pool:
            pool.terminate()
    if not kept_ids:
        raise UsageError(f"dataset={dataset}: no conversation to train on ({_describe(skipped)})")
    offsets = np.cumsum([0] + [len(ids) for ids in kept_ids])
    return np.concatenate(kept_ids), np.concatenate(kept_mask), offsets, skipped


def batch_mean_lm_loss(model, batch):
    """loss_reduction='mean': the micro-batch's mean loss over its trained tokens, as one unit."""
    loss_sum, n_tokens, _ = lm_loss(model, batch)
    return loss_sum / n_tokens.clamp(min=1), 1, {}


def _describe(skipped):
    return ', '.join(f"{n:,} skipped: {why}" for why, n in skipped.items())


# ----------------------------------------------------------------------------- the run

def main(rank, world_size, device):
    master = rank == 0
    t_start = time.time()

    # ---- the model's shape and tokenizer: from our own checkpoint when resuming, else from init_from
    resume_path = find_checkpoint(resume, out_dir)
    init_state = None
    if resume_path:
        saved = checkpoint_meta(resume_path)
        args, tokenizer_spec = ModelArgs(**saved['model_args']), saved['tokenizer']
    elif not os.path.exists(init_from):
        raise UsageError(f"init_from={init_from}: no such file or directory (the demo fine-tunes the demo "
                         f"model: run `python pretrain.py` first)")
    else:
        args, init_state, tokenizer_spec = read_init_weights(init_from, rank, world_size)
    try:
        tokenizer = Tokenizer.load(tokenizer_spec)
    except ValueError as e:
        raise UsageError(f"the model's tokenizer: {e}") from None
    if tokenizer.eos_id is None:
        raise UsageError(f"tokenizer {tokenizer.spec} has no EOS token, which ends every reply in the chat template")
    if tokenizer.vocab_size > args.vocab_size:
        raise UsageError(f"tokenizer {tokenizer.spec} has {tokenizer.vocab_size} tokens, the model only {args.vocab_size}")
    if export_hf and tokenizer.kind == 'tiktoken':  # found out now rather than after the run
        raise UsageError(f"export_hf: tokenizer {tokenizer.spec} cannot be saved in HF format")
    if block_size > args.max_seq_len:
        raise UsageError(f"block_size={block_size} is larger than the model's max_seq_len={args.max_seq_len}")

    # ---- the data, in full, before anything is built or written
    ids, mask, offsets, skipped = load_conversations(dataset, tokenizer, block_size, workers)
    try:  # padding positions are never attended to nor trained on: any token will do
        loader = ChatLoader(ids, mask, offsets, batch_size, rank, world_size, seed, pad_id=tokenizer.eos_id)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if loss_reduction not in ('mean', 'sum'):
        raise UsageError(f"loss_reduction={loss_reduction!r}: expected 'mean' or 'sum'")
    loss_fn = lm_loss if loss_reduction == 'sum' else batch_mean_lm_loss
    max_steps = math.ceil(epochs * loader.steps_per_epoch / grad_accum)
    warmup_steps = int(warmup_ratio * max_steps)  # as open-instruct rounds it

    # ---- model, optimizer, and where the run stands
    model = build_model(args, device, seed, init_state, compile, activation_checkpointing)
    del init_state
    optimizer = build_optimizer(model, lr, weight_decay, betas, eps, device)
    config = {k: globals()[k] for k in config_keys}
    run = Run(out_dir, {'model_args': asdict(args), 'tokenizer': tokenizer.spec, 'config': config},
              log_interval, ckpt_interval, keep_last)
    if master:
        print(describe_model(model, f"resumed from {resume_path}" if resume_path else f"init from {init_from}",
                             world_size, device))
        print(f"data: {dataset}: {loader.conversations:,} conversations, {len(ids):,} tokens, "
              f"{mask.sum() / len(ids):.0%} of them trained on; {_describe(skipped)}")
        print(f"global batch: {batch_size} x {grad_accum} accum x {world_size} ranks = "
              f"{batch_size * grad_accum * world_size} conversations; {epochs} epochs = {max_steps} steps, "
              f"{warmup_steps} of warmup, then linear decay to 0")
    run.start(model, optimizer, loader, resume_path, max_steps, 'sft')

    # ---- the loop
    while run.step < max_steps:
        step_lr = lr_at(run.step, lr, warmup_steps, max_steps, min_lr_ratio=0.0, decay='linear')
        batches = [loader.next_batch() for _ in range(grad_accum)]
        run.end_step(train_step(model, optimizer, batches, loss_fn, step_lr, grad_clip), step_lr)

    run.finish(tokenizer, with_hf=export_hf)
    if master:
        print(f"done: {run.step} steps, {run.tokens:,} tokens in {time.time() - t_start:.0f}s; wrote {out_dir}/final.pt. "
              f"Try: python sample.py --ckpt {out_dir}/final.pt --chat")


if __name__ == '__main__':
    launch(main, globals(), config_keys)
