"""
Pre-train a Moxin-style transformer on token shards (from `python data.py`).

    python pretrain.py                                   # the demo: a small model, 2 CPU cores, minutes
    python pretrain.py config/demo.py --max_steps=100    # a config file, then --key=value overrides
    torchrun --nproc_per_node=8 pretrain.py config/moxin7b_phase1.py    # one node, FSDP2

The same code runs both: under torchrun every block is sharded with FSDP2 (`fully_shard`, then
the root), so each rank holds 1/world_size of the weights, gradients and optimizer state; as a
plain process it is ordinary single-device training. The script reads top to bottom: check the
inputs, build the model, then the loop with its one optimizer step written out; the machinery it
shares with sft.py, dpo.py and grpo.py (building and sharding the model, checkpoints, signals,
logging) is trainer.py's.

What ends up in out_dir (trainer.Run): checkpoints/ (resumable; run the same command again and
it resumes from the newest complete one), log.jsonl, and final.pt, read by sample.py, eval.py and
sft.py; hf/ too with export_hf=True.
"""
import glob
import json
import os
import time
from dataclasses import asdict

from configurator import settings
from dataloader import PackedLoader
from tokenizer import Tokenizer
from trainer import (Run, UsageError, autocast_context, build_model, build_optimizer, check_hf_export, clip_grad_norm,
                     describe_model, evaluate, find_checkpoint, flops_per_token, grad_accum_for, launch, lr_at,
                     mean_over_ranks, preset_args, starting_weights)
from weights import is_hub_id

# ----------------------------------------------------------------------------- defaults (= config/demo.py)
# data and model
data_dir = 'data/pydoc'       # token shards written by `python data.py` (its default out_dir)
preset = 'demo'               # model.PRESETS name, used when starting from scratch
model_overrides = {}          # ModelArgs fields to change in the preset, e.g. {'n_layers': 2}
init_from = ''                # '' = random init; or a .pt checkpoint / HF model dir / HF hub id to continue from
# batch: one optimizer step sees batch_size * grad_accum * world_size sequences of block_size tokens
block_size = 256
batch_size = 8                # sequences per micro-batch per rank
grad_accum = 1                # micro-batches per optimizer step
global_batch_size = 0         # sequences per optimizer step over all ranks: when set, grad_accum is derived
                              # from it (= global_batch_size / (batch_size * world_size)), so a recipe's
                              # batch holds on any number of GPUs
# optimizer and schedule
lr = 2e-3                     # peak learning rate
min_lr_ratio = 0.1            # cosine ends at min_lr_ratio * lr
warmup_steps = 20
max_steps = 200
weight_decay = 0.1            # matrices only
betas = (0.9, 0.95)
eps = 1e-8
grad_clip = 1.0
seed = 1337
# speed / memory
compile = False               # torch.compile each block
activation_checkpointing = False  # recompute each block's activations in backward
# output
out_dir = 'out'
resume = 'auto'               # 'auto' = newest complete checkpoint in out_dir, if any; or a checkpoint dir
ckpt_interval = 100           # steps between resumable checkpoints
keep_last = 2                 # resumable checkpoints kept on disk
log_interval = 10
eval_interval = 50            # steps between validation losses (0 = only at the end)
eval_batches = 4              # micro-batches per validation loss
export_hf = False             # also write {out_dir}/hf, an HF MistralForCausalLM directory
config_keys = settings(globals())


def open_data(rank, world_size):
    """The shards' tokenizer and vocabulary size, the train loader and the validation loader (None
    without val shards), checked before any weights are read: a bad data_dir, too little data for
    the ranks or a validation split too small for eval_batches is one line, not a traceback later."""
    if not (os.path.exists(os.path.join(data_dir, 'meta.json')) and glob.glob(os.path.join(data_dir, 'train_*.bin'))):
        raise UsageError(f"no token shards in {data_dir}: run `python data.py` first "
                         f"(or set data_dir to the out_dir of a finished data.py run)")
    with open(os.path.join(data_dir, 'meta.json')) as f:
        data_meta = json.load(f)
    tokenizer = Tokenizer.load(data_meta['tokenizer'])
    check_hf_export(tokenizer, export_hf)
    try:
        train_loader = PackedLoader(data_dir, 'train', block_size, batch_size, rank, world_size, seed)
        val_loader = None
        if eval_batches > 0 and glob.glob(os.path.join(data_dir, 'val_*.bin')):
            val_loader = PackedLoader(data_dir, 'val', block_size, batch_size, rank, world_size, seed)
    except ValueError as e:  # e.g. too little data for one batch on every rank
        raise UsageError(str(e)) from None
    if val_loader and val_loader.steps_per_epoch < eval_batches:  # each rank validates on windows of its own
        raise UsageError(f"{data_dir} val: {val_loader.windows.sum()} windows of {block_size + 1} tokens, "
                         f"eval_batches={eval_batches} x batch_size={batch_size} x {world_size} ranks needs "
                         f"{eval_batches * batch_size * world_size}: lower eval_batches, or build the data with "
                         f"val_tokens >= {eval_batches * batch_size * world_size * block_size + 1}")
    return tokenizer, data_meta['vocab_size'], train_loader, val_loader


def main(rank, world_size, device):
    master = rank == 0
    t_start = time.time()

    # ---- inputs: check everything cheap before building anything
    tokenizer, data_vocab, train_loader, val_loader = open_data(rank, world_size)
    if init_from and not (os.path.exists(init_from) or is_hub_id(init_from)):
        raise UsageError(f"init_from={init_from}: no such file or directory")
    resume_path = find_checkpoint(resume, out_dir)
    accum = grad_accum_for(global_batch_size, batch_size, world_size) if global_batch_size else grad_accum
    tokens_per_step = batch_size * accum * world_size * block_size
    if resume_path or init_from:  # our own checkpoint's shape (Run.start loads its weights), else init_from's
        args, init_state, _ = starting_weights(init_from, rank, world_size, resume_path)
    else:
        args, init_state = preset_args(preset, model_overrides), None
    if block_size > args.max_seq_len:
        raise UsageError(f"block_size={block_size} is larger than the model's max_seq_len={args.max_seq_len}")
    if data_vocab > args.vocab_size:
        raise UsageError(f"the shards' tokenizer has {data_vocab} tokens, the model only {args.vocab_size}")

    config = {k: globals()[k] for k in config_keys}
    run = Run(out_dir, {'model_args': asdict(args), 'tokenizer': tokenizer.spec, 'config': config},
              log_interval, ckpt_interval, keep_last)

    # ---- model, optimizer, and where the run stands
    model = build_model(args, device, seed, init_state, compile, activation_checkpointing)
    del init_state
    optimizer = build_optimizer(model, lr, weight_decay, betas, eps, device)
    if master:
        origin = f"resumed from {resume_path}" if resume_path else f"init from {init_from}" if init_from else "random init"
        print(describe_model(model, origin, world_size, device))
        print(f"global batch: {batch_size} x {accum} accum x {world_size} ranks = "
              f"{batch_size * accum * world_size} sequences x {block_size} = {tokens_per_step:,} tokens/step; "
              f"{max_steps} steps = {max_steps * tokens_per_step:,} tokens")
    run.start(model, optimizer, train_loader, resume_path, max_steps, 'pretrain')

    val_windows = val_loader.state_dict() if val_loader else None

    def validate():  # on the same windows every time
        if val_loader:
            val_loader.load_state_dict(val_windows)
            val_loss = evaluate(model, val_loader, eval_batches, device)
            run.log({'step': run.step, 'val_loss': val_loss}, f"step {run.step}: val loss {val_loss:.4f}")

    # ---- the loop: one optimizer step per iteration
    while run.step < max_steps:
        if eval_interval and run.step % eval_interval == 0:
            validate()
        t0 = time.perf_counter()
        step_lr = lr_at(run.step, lr, warmup_steps, max_steps, min_lr_ratio)
        step_loss = 0.0
        for _ in range(accum):
            x, y = (t.to(device, non_blocking=True) for t in train_loader.next_batch())
            with autocast_context(device):  # bf16 on one CUDA GPU (under torchrun FSDP2's policy does it)
                _, loss = model(x, targets=y)  # mean next-token cross-entropy over the micro-batch
            # every position is a target, so each micro-batch's mean / accum is its share of the step's mean;
            # FSDP2 averages the gradients over the ranks, which completes the mean over the global batch
            (loss / accum).backward()
            step_loss += loss.detach() / accum
        grad_norm = clip_grad_norm(model, grad_clip)
        for group in optimizer.param_groups:
            group['lr'] = step_lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.end_step({'loss': mean_over_ranks(step_loss), 'grad_norm': grad_norm, 'tokens': tokens_per_step,
                      'flops': flops_per_token(args, block_size) * tokens_per_step,
                      'seconds': time.perf_counter() - t0}, step_lr)

    validate()
    run.finish(tokenizer, with_hf=export_hf)
    if master:
        print(f"done: {run.step} steps, {run.tokens:,} tokens in {time.time() - t_start:.0f}s; wrote {out_dir}/final.pt"
              f"{' and ' + os.path.join(out_dir, 'hf') if export_hf else ''}. Try: python sample.py --ckpt {out_dir}/final.pt")


if __name__ == '__main__':
    launch(main, globals(), config_keys)
