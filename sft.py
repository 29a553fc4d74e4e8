"""
Supervised fine-tuning (SFT): teach a pre-trained model to chat.

    python sft.py                                          # the demo: out/final.pt on this Python's docs as Q&A
    python sft.py --dataset=arithmetic --out_dir=out/sft_arithmetic   # the math demo, for grpo.py
    python sft.py --dataset=chats.jsonl --init_from=path/to/hf_model
    torchrun --nproc_per_node=8 sft.py config/sft_tulu3.py    # Moxin-7B instruct, FSDP2

Each conversation is rendered in Moxin's (Tulu's) chat template by tokenizer.encode_chat,
    <|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n...</s>\\n
and the loss is computed on the assistant replies and the EOS closing each of them only: the
model learns to answer, and to stop, not to imitate the user. The data is read by chats.py;
the model build, FSDP2, precision, AdamW, the step, checkpoints, resume, logging and fault
handling are trainer.py's, shared with pretrain.py: only the batches and the schedule differ.

Data (`dataset`, read by chats.rows):
    'pydoc'                         offline: questions about this interpreter's functions, classes
                                    and language topics, answered with their documentation
    'arithmetic'                    offline: seeded arithmetic word problems answered "... \\boxed{N}"
                                    (chats.arithmetic_problems), the task grpo.py's demo trains on next
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
import math
import os
import time
from dataclasses import asdict

from chats import chat_tokenizer, describe_skipped, load_conversations
from configurator import settings
from dataloader import ChatLoader
from trainer import (Run, UsageError, build_model, build_optimizer, check_hf_export, describe_model, find_checkpoint,
                     grad_accum_for, launch, lm_loss, lr_at, starting_weights, train_step)
from weights import is_hub_id

# ----------------------------------------------------------------------------- defaults (= the demo)
init_from = 'out/final.pt'     # the model to fine-tune: a .pt checkpoint of this project, an HF model dir or hub id
dataset = 'pydoc'              # 'pydoc', a .jsonl file, or a Hugging Face dataset name (see above)
block_size = 256               # tokens per conversation; longer ones are cut (their tail is not trained on)
# batch: one optimizer step sees batch_size * grad_accum * world_size conversations
batch_size = 8                 # conversations per micro-batch per rank
grad_accum = 2
global_batch_size = 0          # conversations per optimizer step over all ranks: when set, grad_accum is
                               # derived from it (= global_batch_size / (batch_size * world_size))
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


def batch_mean_lm_loss(model, batch):
    """loss_reduction='mean': the micro-batch's mean loss over its trained tokens, as one unit."""
    loss_sum, n_tokens, _ = lm_loss(model, batch)
    return loss_sum / n_tokens.clamp(min=1), 1, {}


def main(rank, world_size, device):
    master = rank == 0
    t_start = time.time()

    # ---- the model's shape and tokenizer: from our own checkpoint when resuming, else from init_from
    resume_path = find_checkpoint(resume, out_dir)
    accum = grad_accum_for(global_batch_size, batch_size, world_size, 'conversations') if global_batch_size else grad_accum
    if not resume_path and not (os.path.exists(init_from) or is_hub_id(init_from)):
        raise UsageError(f"init_from={init_from}: no such file or directory (the demo fine-tunes the demo "
                         f"model: run `python pretrain.py` first)")
    args, init_state, tokenizer_spec = starting_weights(init_from, rank, world_size, resume_path)
    tokenizer = chat_tokenizer(tokenizer_spec, args, block_size)
    check_hf_export(tokenizer, export_hf)

    # ---- the data, in full, before anything is built or written
    ids, mask, offsets, skipped = load_conversations(dataset, tokenizer, block_size, workers)
    try:
        loader = ChatLoader(ids, mask, offsets, batch_size, rank, world_size, seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if loss_reduction not in ('mean', 'sum'):
        raise UsageError(f"loss_reduction={loss_reduction!r}: expected 'mean' or 'sum'")
    loss_fn = lm_loss if loss_reduction == 'sum' else batch_mean_lm_loss
    max_steps = math.ceil(epochs * loader.steps_per_epoch / accum)
    warmup_steps = int(warmup_ratio * max_steps)  # as open-instruct rounds it

    config = {k: globals()[k] for k in config_keys}
    run = Run(out_dir, {'model_args': asdict(args), 'tokenizer': tokenizer.spec, 'config': config},
              log_interval, ckpt_interval, keep_last)

    # ---- model, optimizer, and where the run stands
    model = build_model(args, device, seed, init_state, compile, activation_checkpointing)
    del init_state
    optimizer = build_optimizer(model, lr, weight_decay, betas, eps, device)
    if master:
        print(describe_model(model, f"resumed from {resume_path}" if resume_path else f"init from {init_from}",
                             world_size, device))
        print(f"data: {dataset}: {loader.conversations:,} conversations, {len(ids):,} tokens, "
              f"{mask.sum() / len(ids):.0%} of them trained on; {describe_skipped(skipped)}")
        print(f"global batch: {batch_size} x {accum} accum x {world_size} ranks = "
              f"{batch_size * accum * world_size} conversations; {epochs} epochs = {max_steps} steps, "
              f"{warmup_steps} of warmup, then linear decay to 0")
    run.start(model, optimizer, loader, resume_path, max_steps, 'sft')

    # ---- the loop
    while run.step < max_steps:
        step_lr = lr_at(run.step, lr, warmup_steps, max_steps, min_lr_ratio=0.0, decay='linear')
        batches = [loader.next_batch() for _ in range(accum)]
        run.end_step(train_step(model, optimizer, batches, loss_fn, step_lr, grad_clip), step_lr)

    run.finish(tokenizer, with_hf=export_hf)
    if master:
        print(f"done: {run.step} steps, {run.tokens:,} tokens in {time.time() - t_start:.0f}s; wrote {out_dir}/final.pt. "
              f"Try: python sample.py --ckpt {out_dir}/final.pt --chat")


if __name__ == '__main__':
    launch(main, globals(), config_keys)
