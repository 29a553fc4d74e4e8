"""
Direct preference optimisation (DPO): teach a fine-tuned chat model which of two answers to prefer.

    python dpo.py                                   # the demo: out/dpo/final.pt from the SFT demo's out/sft/final.pt
    python dpo.py --dataset=pairs.jsonl --init_from=path/to/hf_model
    torchrun --nproc_per_node=8 dpo.py config/dpo_tulu3.py    # Moxin-7B-Instruct, FSDP2

Each row is a preference pair in Tulu 3's schema: 'chosen' and 'rejected', two conversations
that share every message but the final assistant response. Both are rendered by
tokenizer.encode_chat (the template SFT trained on), and only that final response and its EOS
are scored. With log p(y|x) a response's summed log-probability under the policy being trained
and log p_ref(y|x) under the model it starts from (the reference),

    loss = -log sigmoid(beta * ((log p(y_w|x) - log p_ref(y_w|x)) - (log p(y_l|x) - log p_ref(y_l|x))))

for chosen y_w and rejected y_l (Rafailov et al. 2023, loss_type='dpo'). loss_type='dpo_norm'
(open-instruct's, which Tulu 3 and Moxin-Instruct train with) divides each log-probability by its
response's number of tokens first, so a long answer is not preferred, or punished, for its
length alone. beta * (log p - log p_ref) of a response is its implicit reward: logged as TRL
does, rewards/chosen, rewards/rejected, rewards/margins (chosen - rejected) and
rewards/accuracies (how often chosen > rejected).

The reference model costs no memory: before the first update, one pass of the starting model
(the same, sharded model, without gradients) computes the reference log-probs of every response,
stored in out_dir/reference_logps.pt with a fingerprint of the data, the micro-batches and
init_from; a resumed run reads them back, a run with other data or another init_from refuses
them. The micro-batches are drawn once (dataloader.PairLoader), so at the first step the policy's
log-probs equal the reference's bit for bit: the loss is ln 2 and every reward 0.

Data (`dataset`): 'pydoc' (offline: chats.pydoc_preferences, a question about this interpreter's
documentation, its answer chosen and another object's answer rejected), a .jsonl file of pairs,
or a Hugging Face dataset such as allenai/llama-3.1-tulu-3-8b-preference-mixture. heldout_pairs of
them, drawn with the seed, are never trained on: their rewards are reported before and after
training, with logps/accuracies, how often the model itself gives the chosen response the
higher (per-token, under dpo_norm) log-probability. Bad input (a row without chosen/rejected, an
unknown role, prompts that differ, an empty response) stops the run before anything is written,
naming the row; a pair longer than block_size is skipped and counted.

What ends up in out_dir: reference_logps.pt, and as for sft.py checkpoints/, log.jsonl, final.pt.
"""
import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from chats import chat_tokenizer, describe_skipped, load_pairs
from configurator import settings
from dataloader import PairLoader
from trainer import (Run, UsageError, autocast_context, build_model, build_optimizer, check_hf_export, describe_model,
                     find_checkpoint, grad_accum_for, launch, lr_at, starting_weights, train_step)
from weights import fetch_from_hub, is_hub_id

# ----------------------------------------------------------------------------- defaults (= the demo)
init_from = 'out/sft/final.pt'  # the model to tune and the reference: sft.py's output, an HF model dir or hub id
dataset = 'pydoc'              # 'pydoc', a .jsonl file, or a Hugging Face dataset name (see above)
heldout_pairs = 100            # pairs kept out of training, drawn with the seed, to report on
block_size = 256               # tokens per conversation; a pair with a longer one is skipped
loss_type = 'dpo_norm'         # 'dpo_norm' (per-token log-probs, Tulu 3) or 'dpo' (summed, Rafailov et al.)
beta = 5.0                     # how far the policy may move from the reference (Tulu 3's value)
# batch: one optimizer step sees batch_size * grad_accum * world_size pairs
batch_size = 8                 # pairs per micro-batch per rank (2 x as many conversations)
grad_accum = 2
global_batch_size = 0          # pairs per step over all ranks; when set, grad_accum follows from it
epochs = 2.0                   # passes over the training pairs (float); 3 would risk the demo's 10 minutes on 2 cores
# optimizer and schedule: linear warmup, then linear decay to 0 (open-instruct's)
lr = 1e-4
warmup_ratio = 0.1
weight_decay = 0.0
betas = (0.9, 0.95)
eps = 1e-8
grad_clip = 1.0
seed = 1337
# speed / memory
compile = False
activation_checkpointing = False
# output
out_dir = 'out/dpo'
resume = 'auto'                # 'auto' = newest complete checkpoint in out_dir, if any; or a checkpoint dir
ckpt_interval = 100
keep_last = 2
log_interval = 10
export_hf = False              # also write {out_dir}/hf, an HF MistralForCausalLM directory
workers = 1                    # processes (per rank) that tokenize the data
config_keys = settings(globals())


# ----------------------------------------------------------------------------- the loss

def sequence_logps(model, x, y):
    """Each row's summed log-probability of its target tokens (y != -1) [2B], and their number [2B]."""
    return model.token_logprobs(x, y).sum(-1), (y != -1).sum(-1)


def preference_terms(policy, reference, counts, beta, loss_type):
    """Per pair, from summed log-probs [B, 2] (chosen, rejected) of the policy and the reference
    and the responses' token counts: (loss, chosen reward, rejected reward), each [B]."""
    if loss_type == 'dpo_norm':
        policy, reference = policy / counts, reference / counts
    rewards = beta * (policy - reference)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def metric_sums(chosen, rejected):
    """What TRL logs, as sums over the pairs (divided by their number when logged)."""
    return {'rewards/chosen': chosen.sum(), 'rewards/rejected': rejected.sum(),
            'rewards/accuracies': (chosen > rejected).sum(), 'rewards/margins': (chosen - rejected).sum()}


def dpo_loss(model, batch, reference, beta, loss_type):
    """loss_fn for trainer.train_step: the summed loss over the micro-batch's pairs, their number, metric sums."""
    x, y, index = batch
    logps, counts = sequence_logps(model, x, y)
    as_pairs = lambda t: t.view(2, -1).T  # rows: chosen ones, then rejected ones
    losses, chosen, rejected = preference_terms(as_pairs(logps), reference[index], as_pairs(counts), beta, loss_type)
    return losses.sum(), len(index), {k: v.detach() for k, v in metric_sums(chosen, rejected).items()}


# ----------------------------------------------------------------------------- the reference, and held-out pairs

def split_pairs(n_pairs, heldout_pairs, seed):
    """(held-out, training) pair numbers: heldout_pairs of the n_pairs drawn with the seed, and the rest."""
    order = np.random.default_rng(seed).permutation(n_pairs)
    return np.sort(order[:heldout_pairs]), np.sort(order[heldout_pairs:])


@torch.no_grad()
def score_pairs(model, loader, n_pairs, device):
    """Summed log-probs [n_pairs, 2] (chosen, rejected) of every pair of loader's groups, each group
    computed by one rank in the micro-batch training uses, then shared: the same on every rank."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    logps = torch.zeros(n_pairs, 2, device=device)
    n_groups = len(loader.groups)
    for first in tqdm(range(0, n_groups, world_size), disable=rank != 0, desc='scoring pairs', leave=False):
        g = first + rank
        # every rank runs as many forwards: FSDP gathers each block's weights from all of them
        x, y, index = loader.group(min(g, n_groups - 1))
        with autocast_context(device):
            sums, _ = sequence_logps(model, x.to(device), y.to(device))
        if g < n_groups:
            logps[index.to(device)] = sums.view(2, -1).T.float()
    if dist.is_initialized():
        dist.all_reduce(logps)  # each pair was written by one rank, zeros elsewhere
    return logps


def fingerprint(ids, mask, offsets, loaders, init_from):
    """What the reference log-probs depend on: the tokenized pairs, how they are grouped into
    micro-batches, and the starting weights (their path, size and modification time)."""
    digest = hashlib.sha256()
    for array in (ids, mask, offsets, *(g for loader in loaders for g in loader.groups)):
        digest.update(np.ascontiguousarray(array).tobytes())
    files = [init_from] if os.path.isfile(init_from) else sorted(os.path.join(init_from, f) for f in os.listdir(init_from))
    stamps = [(os.path.realpath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return digest.hexdigest() + hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]


def compute_reference(model, loaders, n_pairs, device, path, key, about):
    """The starting model's log-probs of every pair of the loaders, saved to path (by rank 0) with its fingerprint."""
    reference = sum(score_pairs(model, loader, n_pairs, device) for loader in loaders)
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({'fingerprint': key, 'logps': reference.cpu(), 'about': about}, path + '.tmp')
        os.replace(path + '.tmp', path)
        print(f"reference log-probs of {n_pairs:,} pairs: {path}")
    return reference


def cached_reference(path, key, resume_path):
    """The reference log-probs saved for this very run, or None when they are still to be computed."""
    if not os.path.exists(path):
        if resume_path:
            raise UsageError(f"resuming from {resume_path} needs {path}, the initial model's log-probs, which is missing: "
                             f"start over in a new out_dir")
        return None
    try:
        cache = torch.load(path, weights_only=True)
        saved_key, about = cache['fingerprint'], cache['about']
    except Exception as e:  # a truncated or foreign file
        raise UsageError(f"{path}: not a reference log-probs file ({type(e).__name__}); start over in a new out_dir") from None
    if saved_key != key:
        raise UsageError(f"{path} holds the reference log-probs of other data, batching or init_from "
                         f"(it was computed for {about}): use a new out_dir for this run")
    return cache['logps']


def heldout_report(policy, reference, counts, beta, loss_type):
    """Mean loss and TRL's reward metrics over held-out pairs, and logps/accuracies: how often the
    policy itself gives the chosen response the higher (per-token under dpo_norm) log-probability."""
    losses, chosen, rejected = (t.double() for t in preference_terms(policy, reference, counts, beta, loss_type))
    scores = policy / counts if loss_type == 'dpo_norm' else policy
    sums = {'loss': losses.sum(), **metric_sums(chosen, rejected),
            'logps/accuracies': (scores[:, 0] > scores[:, 1]).sum()}
    return {k: v.item() / len(policy) for k, v in sums.items()}


def log_report(run, when, report):
    """A held-out report to log.jsonl (keys heldout/..., at the step it was taken: 0 before training) and the terminal."""
    run.log({'step': run.step, **{f'heldout/{k}': v for k, v in report.items()}},
            f"held-out pairs {when} training: reward accuracy {report['rewards/accuracies']:.3f}, margin "
            f"{report['rewards/margins']:.3f}, loss {report['loss']:.4f}; the model prefers the chosen "
            f"response in {report['logps/accuracies']:.1%}")


# ----------------------------------------------------------------------------- the run

def main(rank, world_size, device):
    master = rank == 0
    t_start = time.time()

    # ---- the starting model (also the reference, and part of its fingerprint even when resuming)
    if not (os.path.exists(init_from) or is_hub_id(init_from)):
        raise UsageError(f"init_from={init_from}: no such file or directory (the demo tunes the SFT demo "
                         f"model: run `python sft.py` first)")
    init_path = fetch_from_hub(init_from) if is_hub_id(init_from) else init_from  # the files it fingerprints
    resume_path = find_checkpoint(resume, out_dir)
    accum = grad_accum_for(global_batch_size, batch_size, world_size, 'pairs') if global_batch_size else grad_accum
    args, init_state, tokenizer_spec = starting_weights(init_path, rank, world_size, resume_path)
    tokenizer = chat_tokenizer(tokenizer_spec, args, block_size)
    check_hf_export(tokenizer, export_hf)
    if loss_type not in ('dpo_norm', 'dpo'):
        raise UsageError(f"loss_type={loss_type!r}: expected 'dpo_norm' or 'dpo'")

    # ---- the pairs, in full, before anything is built or written; held-out ones drawn with the seed
    ids, mask, offsets, skipped = load_pairs(dataset, tokenizer, block_size, workers, seed)
    n_pairs = (len(offsets) - 1) // 2
    if not 0 < heldout_pairs < n_pairs:
        raise UsageError(f"heldout_pairs={heldout_pairs}: expected at least 1 and fewer than the {n_pairs} pairs")
    heldout, train = split_pairs(n_pairs, heldout_pairs, seed)
    make_loader = partial(PairLoader, ids, mask, offsets, batch_size=batch_size, rank=rank, world_size=world_size,
                          seed=seed)
    loader, heldout_loader = make_loader(train), make_loader(heldout)
    if loader.steps_per_epoch == 0:
        raise UsageError(f"{len(train)} training pairs cannot fill one batch of {batch_size} on each of {world_size} ranks")
    counts = torch.from_numpy(np.add.reduceat(mask, offsets[:-1]).reshape(-1, 2)).to(device)  # scored tokens
    max_steps = math.ceil(epochs * loader.steps_per_epoch / accum)
    warmup_steps = int(warmup_ratio * max_steps)  # as open-instruct rounds it
    cache_path = os.path.join(out_dir, 'reference_logps.pt')
    key = fingerprint(ids, mask, offsets, (loader, heldout_loader), init_path)
    reference = cached_reference(cache_path, key, resume_path)

    # ---- model, optimizer, the reference log-probs, and where the run stands
    model = build_model(args, device, seed, init_state, compile, activation_checkpointing)
    del init_state
    optimizer = build_optimizer(model, lr, weight_decay, betas, eps, device)
    config = {k: globals()[k] for k in config_keys}
    run = Run(out_dir, {'model_args': asdict(args), 'tokenizer': tokenizer.spec, 'config': config},
              log_interval, ckpt_interval, keep_last)
    if master:
        print(describe_model(model, f"resumed from {resume_path}" if resume_path else f"init from {init_from}",
                             world_size, device))
        print(f"data: {dataset}: {n_pairs:,} pairs ({len(train):,} to train on, {len(heldout):,} held out), "
              f"{mask.sum():,} response tokens; {describe_skipped(skipped)}")
        print(f"global batch: {batch_size} x {accum} accum x {world_size} ranks = "
              f"{batch_size * accum * world_size} pairs; {epochs} epochs = {max_steps} steps, "
              f"{warmup_steps} of warmup, then linear decay to 0; {loss_type}, beta {beta}")
    if reference is None:
        reference = compute_reference(model, (loader, heldout_loader), n_pairs, device, cache_path, key,
                                      f"dataset={dataset}, init_from={init_from}, {n_pairs} pairs")
    reference = reference.to(device)
    heldout_index = torch.from_numpy(heldout).to(device)
    before = heldout_report(reference[heldout_index], reference[heldout_index], counts[heldout_index], beta, loss_type)
    run.start(model, optimizer, loader, resume_path, max_steps, 'dpo')
    if not resume_path:
        log_report(run, 'before', before)

    # ---- the loop
    loss_fn = partial(dpo_loss, reference=reference, beta=beta, loss_type=loss_type)
    while run.step < max_steps:
        step_lr = lr_at(run.step, lr, warmup_steps, max_steps, min_lr_ratio=0.0, decay='linear')
        batches = [loader.next_batch() for _ in range(accum)]
        run.end_step(train_step(model, optimizer, batches, loss_fn, step_lr, grad_clip), step_lr)

    policy = score_pairs(model, heldout_loader, n_pairs, device)[heldout_index]
    after = heldout_report(policy, reference[heldout_index], counts[heldout_index], beta, loss_type)
    log_report(run, 'after', after)
    run.finish(tokenizer, with_hf=export_hf)
    if master:
        print(f"done: {run.step} steps, {run.tokens:,} tokens in {time.time() - t_start:.0f}s; held-out reward "
              f"accuracy {before['rewards/accuracies']:.3f} -> {after['rewards/accuracies']:.3f}; wrote "
              f"{out_dir}/final.pt. Try: python sample.py --ckpt {out_dir}/final.pt --chat")


if __name__ == '__main__':
    launch(main, globals(), config_keys)
