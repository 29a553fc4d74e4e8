"""
Reinforcement learning with a verifiable reward: GRPO (Group Relative Policy Optimization,
DeepSeekMath; DeepSeek-R1), the stage that turns Moxin-7B-Instruct, fine-tuned on chain-of-thought
data, into Moxin-7B-Reasoning with DeepScaleR's recipe.

    python grpo.py                                           # the demo: out/sft_arithmetic/final.pt on arithmetic problems
    python grpo.py --dataset=problems.jsonl --init_from=path/to/hf_model
    torchrun --nproc_per_node=8 grpo.py config/grpo_deepscaler.py    # Moxin-7B-Reasoning, FSDP2

One step, for prompts_per_step math problems (each asked as chats.math_prompt: the problem, then
"...output the final answer within \\boxed{}"):
  1. rollout      group_size completions o_1..o_G of each prompt q, sampled from the current policy
  2. reward       r_i = tasks.math_grader.math_reward(o_i, answer): 1 if the last \\boxed{} is the answer, else 0
  3. advantage    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps), the same for every token of o_i;
                  a group whose rewards are all equal teaches nothing and gets A = 0
  4. loss         per response token t of o_i, with ratio_t = pi(o_t) / pi_old(o_t) against the
                  log-probs the completions were sampled with, and the frozen starting model pi_ref:
                    L_t = -min(ratio_t A_i, clip(ratio_t, 1 - clip_eps, 1 + clip_eps) A_i)
                          + kl_coef * (pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1)
                  averaged over all response tokens of the step; then ppo_epochs x mini_batches
                  optimizer steps on the rollouts (1 x 1: fully on-policy, ratio = 1)

The model build, FSDP2, AdamW, the optimizer step (trainer.train_step, shared with sft.py and
dpo.py), checkpoints, resume, signals, the NaN guard and logging are trainer.py's; this file adds the
four parts above. Rollouts are sampled from an unsharded copy of the policy (as verl samples with a separate
vLLM engine), re-synced every step; each completion's sampling seed depends only on (seed, step,
its prompt's slot in the step, its number in the group), so 1 process and torchrun, and any
rollout_rows, draw the same completions, and a resumed run draws the same ones it would have.

Data (`dataset`, read by chats.rows): rows {problem, answer} (DeepScaleR's schema):
    'arithmetic'            offline: chats.arithmetic_problems('train'), the demo task sft.py learned
    a path ending in .jsonl one problem per line
    anything else           a Hugging Face dataset, e.g. agentica-org/DeepScaleR-Preview-Dataset
`eval_dataset` (e.g. 'arithmetic:heldout', problems in sentences never trained on) is answered
before and after training, greedily and eval_samples times sampled as in the rollouts; both
accuracies go to the terminal and log.jsonl, and after training their gains over the first pass,
problem by problem, with paired standard errors (heldout_gain, heldout_sampled_gain, ..._se).

Bad input stops the run before anything is written, naming the row: a row without its problem or
answer, an answer the grader cannot match even to itself; a prompt that leaves fewer than
max_new_tokens of block_size for its answer is skipped and counted.
"""
import os
import time
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from chats import chat_tokenizer, math_prompt, rows
from configurator import settings
from dataloader import resume_position
from model import GREEDY, Sampling, Transformer, generate, seeded_generator
from tasks.math_grader import math_reward
from tokenizer import encode_chat
from weights import is_hub_id
from trainer import (Run, UsageError, autocast_context, build_model, build_optimizer, check_hf_export, checkpoint_meta,
                     describe_model, find_checkpoint, launch, lr_at, starting_weights, train_step)

# ----------------------------------------------------------------------------- defaults (= the demo)
init_from = 'out/sft_arithmetic/final.pt'  # the policy's start and the frozen reference (sft.py --dataset=arithmetic)
dataset = 'arithmetic'          # 'arithmetic', a .jsonl file, or a Hugging Face dataset of {problem, answer} rows
eval_dataset = 'arithmetic:heldout'  # answered greedily before and after training; '' = none
eval_limit = 200                # problems of eval_dataset to answer
eval_samples = 8                # and sampled eval_samples times each (at temperature / top_p); 0 = greedy only
block_size = 128                # prompt + response tokens
max_new_tokens = 32             # the longest response; prompts longer than block_size - max_new_tokens are skipped
rollout_rows = 64               # completions generated at once on a rank (the rows of its KV cache): memory only,
                                # every completion is the same for any value
# one step: prompts_per_step prompts x group_size sampled completions, over all ranks
prompts_per_step = 8
group_size = 8
temperature = 1.0
top_p = 1.0
# the loss
clip_eps = 0.2                  # PPO's clip on the probability ratio
kl_coef = 0.001                 # weight of the k3 KL(policy || reference) per token; 0 = no reference model
adv_eps = 1e-6                  # in the advantage's denominator (verl's epsilon)
ppo_epochs = 1                  # passes over each step's rollouts
mini_batches = 1                # optimizer steps per pass; 1 x 1 = on-policy
micro_batch_tokens = 4096       # the most padded tokens (rows x longest row) in one forward/backward: completions
                                # are packed up to it (verl's ppo_max_token_len_per_gpu); memory only: the step is the same
# optimizer and schedule
max_steps = 80                  # the demo: 80 steps at 5e-5 beat 40 at 2e-4 on held-out problems over 3 seeds (docs/grpo.md)
lr = 5e-5
warmup_steps = 0
min_lr_ratio = 1.0              # 1.0 = constant after warmup (verl's default); else cosine down to it
weight_decay = 0.0
betas = (0.9, 0.999)
eps = 1e-8
grad_clip = 1.0
seed = 1337
# speed / memory
compile = False
activation_checkpointing = False
dist_timeout_min = 60           # how long ranks wait for each other at a collective: each rank samples its own
                                # rollouts, so ranks reach the update minutes apart (PyTorch's default is 10)
# output
out_dir = 'out/grpo'
resume = 'auto'                 # 'auto' = newest complete checkpoint in out_dir, if any; or a checkpoint dir
ckpt_interval = 20
keep_last = 2
log_interval = 1
export_hf = False
config_keys = settings(globals())


# ----------------------------------------------------------------------------- prompts

def load_prompts(dataset, tokenizer, max_prompt_tokens, at_least=0):
    """Every problem of the dataset as (prompt ids in the chat template, ready for the reply; answer).
    -> (prompts, how many were skipped for being longer than max_prompt_tokens); fewer than at_least
    prompts left is a UsageError."""
    prompts, too_long = [], 0
    for where, row in rows(dataset):
        for field in ('problem', 'answer'):
            if not isinstance(row, dict) or field not in row:
                raise UsageError(f"{where}: no '{field}' field (GRPO needs each problem and its reference answer)")
        answer = row['answer']
        # an answer the grader cannot match to itself would make every completion of it wrong
        if not isinstance(answer, (str, int)) or math_reward(f"\\boxed{{{answer}}}", str(answer)) != 1.0:
            raise UsageError(f"{where}: the grader (tasks.math_grader.math_reward) cannot match answer {answer!r} even to itself")
        try:
            ids, _ = encode_chat(tokenizer, math_prompt(row['problem']), add_generation_prompt=True)
        except ValueError as e:  # a problem that is not a string
            raise UsageError(f"{where}: {e}") from None
        if len(ids) > max_prompt_tokens:
            too_long += 1
        else:
            prompts.append((ids, str(answer)))
    if len(prompts) < at_least:
        raise UsageError(f"dataset={dataset}: {len(prompts)} usable problems ({too_long} skipped: longer than "
                         f"block_size - max_new_tokens = {max_prompt_tokens} tokens) cannot fill one step "
                         f"of prompts_per_step={at_least}")
    return prompts, too_long


class PromptLoader:
    """prompts_per_step prompts per step, each epoch in a new seeded order; rank r of world_size takes
    the step's prompts in slots r, r + world_size, ... state_dict() resumes exactly."""

    def __init__(self, n_prompts, prompts_per_step, rank=0, world_size=1, seed=0):
        self.n_prompts, self.prompts_per_step, self.rank, self.world_size, self.seed = \
            n_prompts, prompts_per_step, rank, world_size, seed
        self.steps_per_epoch = n_prompts // prompts_per_step
        self.epoch = self.step = 0

    def next_prompts(self):
        """-> [(prompt index, its slot among the step's prompts_per_step)] of this rank's prompts."""
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_prompts)
        first = self.step * self.prompts_per_step
        self.step += 1
        return [(int(order[first + j]), j) for j in range(self.rank, self.prompts_per_step, self.world_size)]

    def state_dict(self):
        return dict(epoch=self.epoch, step=self.step, seed=self.seed, world_size=self.world_size,
                    n_prompts=self.n_prompts, prompts_per_step=self.prompts_per_step)

    def load_state_dict(self, state):
        resume_position(self, state)


# ----------------------------------------------------------------------------- 1. rollout

def build_reference(args, device, seed, init_state, fsdp=None, dtype=None):
    """The frozen reference pi_ref: the starting weights, sharded as the policy is (fsdp: as
    trainer.build_model takes it; dryrun.py simulates the reference with this), never updated.
    Its matmul weights are kept in `dtype`, by default the one the training forward computes them in
    (bf16 on CUDA: FSDP2's param_dtype, or autocast on one GPU): the same log-probs as from fp32
    weights, which would be rounded to bf16 in every forward anyway, in half the memory (as verl keeps
    its reference in bf16). The embedding and the norms, 2% of a 7B model that a single GPU's autocast
    computes in fp32, stay fp32."""
    dtype = dtype or (torch.bfloat16 if device.type == 'cuda' else None)  # None: fp32, as the policy
    return build_model(args, device, seed, init_state, fsdp=fsdp, matmul_dtype=dtype).requires_grad_(False)


def build_rollout_model(args, device):
    """The model completions are sampled from: a plain, unsharded Transformer on every rank. Each rank
    generates its own prompts for as many tokens as they take, a different number of forward passes
    per rank, which a sharded model (all-gathering its weights in every forward) could not do.
    bf16 on CUDA, as FSDP2 computes the policy's forward."""
    with torch.device('meta'):
        model = Transformer(args)
    model.to_empty(device=device)
    return model.to(torch.bfloat16 if device.type == 'cuda' else torch.float32).eval().requires_grad_(False)


@torch.no_grad()
def sync_rollout_model(policy, rollout_model):
    """Copy the policy's current weights into the rollout model, one tensor at a time: under FSDP each
    is gathered whole from its shards, copied (cast to the rollout model's dtype) and freed, so the
    sync never holds more than one full tensor (a whole fp32 state dict of a 7B model is 30 GiB)."""
    for p, q in zip(policy.parameters(), rollout_model.parameters(), strict=True):
        q.copy_(p.full_tensor() if isinstance(p, DTensor) else p)


def group_generators(seed, step, slot, n, device):
    """The random generators of one group, one per completion: completion j of the prompt in the
    step's slot draws from a function of (seed, step, slot, j) alone."""
    return [seeded_generator((seed, step, slot, j), device) for j in range(n)]


def rollout(model, prompts, generators, max_new_tokens, sampling, eos_id, chunk_rows, after_chunk=None):
    """len(generators[i]) completions of prompt i (new token ids, ending with EOS unless cut at
    max_new_tokens), drawn as `sampling` says; batched, chunk_rows completions per generate() call
    (the KV cache holds that many rows; a prompt's samples side by side, so each prompt is prefilled
    once per chunk it falls in). Completion j of prompt i draws from generators[i][j] alone, so the
    chunking, and which prompts share a chunk or a rank, change nothing. after_chunk() runs after
    each chunk (main checks for a stop signal there)."""
    rows = [(i, j) for i, group in enumerate(generators) for j in range(len(group))]
    groups = [[None] * len(group) for group in generators]
    for start in range(0, len(rows), chunk_rows):
        chunk = rows[start:start + chunk_rows]
        new = generate(model, [prompts[i] for i, _ in chunk], max_new_tokens, sampling, eos_id=eos_id,
                       generator=[generators[i][j] for i, j in chunk])
        for (i, j), completion in zip(chunk, new):
            groups[i][j] = completion
        if after_chunk:
            after_chunk()
    return groups


# ----------------------------------------------------------------------------- 2. reward: tasks.math_grader.math_reward
# ----------------------------------------------------------------------------- 3. advantages, and the step's micro-batches

def group_advantages(rewards, eps=1e-6):
    """rewards [prompts, group_size] -> advantages, the same shape:
    A_i = (r_i - mean(r)) / (std(r) + eps) within each group (std unbiased, as verl's torch.std);
    a group whose rewards are all equal gets exactly 0."""
    mean, std = rewards.mean(dim=1, keepdim=True), rewards.std(dim=1, keepdim=True)
    return torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def collate(completions, pad_id):
    """A micro-batch (x, y, advantage) of (prompt ids, completion ids, advantage) triples: x = (prompt +
    completion)[:-1] right-padded, y = the completion's tokens at the positions that predict them and
    -1 elsewhere (the prompt, the padding after a row has ended): only response tokens carry loss.
    pad_id: any id will do (main passes EOS): padding follows every real token and is never a target."""
    T = max(len(p) + len(c) for p, c, _ in completions) - 1
    x = torch.full((len(completions), T), pad_id, dtype=torch.long)
    y = torch.full((len(completions), T), -1, dtype=torch.long)
    for r, (p, c, _) in enumerate(completions):
        seq = torch.tensor(p + c, dtype=torch.long)
        x[r, :len(seq) - 1] = seq[:-1]
        y[r, len(p) - 1:len(seq) - 1] = seq[len(p):]
    return x, y, torch.tensor([a for _, _, a in completions], dtype=torch.float32)


def micro_batches(completions, max_tokens, pad_id):
    """(prompt, completion, advantage) triples packed into micro-batches (collate) of at most max_tokens
    padded tokens each, rows x the longest row: longest first, so rows of like lengths share a micro-batch
    and little of it is padding. A completion longer than max_tokens is a micro-batch of its own."""
    length = lambda c: len(c[0]) + len(c[1]) - 1
    out, current = [], []
    for c in sorted(completions, key=length, reverse=True):  # stable: the same order on every run
        if current and (len(current) + 1) * length(current[0]) > max_tokens:
            out.append(collate(current, pad_id))
            current = []
        current.append(c)
    return out + ([collate(current, pad_id)] if current else [])


def mini_batches_of(prompts, slots, groups, advantages, pad_id, prompts_per_step, mini_batches, micro_batch_tokens):
    """The step's completions as mini_batches lists of micro-batches. Mini-batch m holds the prompts in
    slots [m P/M, (m+1) P/M) of the step, on every rank, so it is the same set of completions
    whatever the world size. Each group is packed into micro-batches of its own: a group lives on one
    rank, so the micro-batches, their padding and every number logged are the same on any number."""
    per_mini = prompts_per_step // mini_batches
    out = [[] for _ in range(mini_batches)]
    for p, slot, group, adv in zip(prompts, slots, groups, advantages.tolist()):
        out[slot // per_mini] += micro_batches([(p, c, a) for c, a in zip(group, adv)], micro_batch_tokens, pad_id)
    return out


# ----------------------------------------------------------------------------- 4. the loss

def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef):
    """The GRPO loss of a batch of completions, summed over its response tokens (mask):
    -> (loss sum, response tokens, {'kl': sum, 'clip_frac': sum}); train_step divides by the step's tokens."""
    adv = advantages[:, None]
    ratio = torch.exp(logp - old_logp)                                # ratio_t = pi(o_t) / pi_old(o_t)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    surrogate = torch.max(unclipped, clipped)                         # -min(ratio A, clip(ratio, 1-eps, 1+eps) A)
    log_ref_ratio = ref_logp - logp
    kl = (torch.exp(log_ref_ratio) - log_ref_ratio - 1).clamp(max=10)  # k3 = pi_ref/pi - log(pi_ref/pi) - 1 >= 0,
    # an unbiased, low-variance estimate of KL(pi || pi_ref) per sampled token (verl's low_var_kl, clamped at 10 too)
    m = mask.to(logp.dtype)
    return ((surrogate + kl_coef * kl) * m).sum(), m.sum(), {
        'kl': (kl * m).sum().detach(), 'clip_frac': ((clipped > unclipped) * m).sum()}


def grpo_loss(model, batch, clip_eps, kl_coef):
    """train_step's loss_fn. Aggregation: the mean over every response token of the step, over all
    micro-batches and ranks (train_step divides the sums by the step's tokens). DeepScaleR's verl takes
    the masked mean over each micro-batch's response tokens ('token-mean', verl's loss_agg_mode default)
    and averages the micro-batches, which weighs a token by how full its micro-batch is; one mean over
    the step is what that approximates, and it does not change with the number of ranks."""
    x, y, advantages, old_logp, ref_logp = batch
    return policy_loss(model.token_logprobs(x, y), old_logp, ref_logp, advantages, y != -1, clip_eps, kl_coef)


@torch.no_grad()
def with_logprobs(policy, reference, micro_batch, device):
    """A micro-batch with the log-probs of its tokens appended: under the policy as it sampled them
    (pi_old, before any update of this step) and under the reference (zeros without one: kl_coef = 0).
    Computed in the precision the training forward runs in (train_step's autocast), so that before the
    first update the ratio pi / pi_old is exactly 1 and the KL to an identical reference exactly 0."""
    x, y, advantages = micro_batch
    xd, yd = x.to(device), y.to(device)
    with autocast_context(device):
        old = policy.token_logprobs(xd, yd).cpu()
        ref = reference.token_logprobs(xd, yd).cpu() if reference is not None else torch.zeros_like(old)
    return x, y, advantages, old, ref


def update(policy, optimizer, minis, loss_fn, step_lr, ppo_epochs, grad_clip):
    """ppo_epochs passes over the step's mini-batches, one optimizer step (trainer.train_step) each.
    -> the stats of the step: the mean of each number over the optimizer steps, tokens/flops/seconds summed."""
    all_stats = [train_step(policy, optimizer, micro, loss_fn, step_lr, grad_clip)
                 for _ in range(ppo_epochs) for micro in minis]
    summed = ('tokens', 'flops', 'seconds')
    return {k: float((np.sum if k in summed else np.mean)([s[k] for s in all_stats])) for k in all_stats[0]}


# ----------------------------------------------------------------------------- held-out accuracy

HELDOUT_STEP = 2 ** 31 - 1  # the step the held-out samples are drawn at: no training step's, the same before and after


def heldout_scores(model, problems, tokenizer, seed, max_new_tokens, samples, sampling, chunk_rows):
    """Each problem (prompt ids, answer) answered and graded by tasks.math_grader.math_reward: -> float64
    [2, len(problems)]: row 0 is 1 where the greedy answer is right, row 1 the fraction of `samples`
    completions drawn as the rollouts are that are right (its mean is DeepScaleR's "pass@1 averaged
    over 16 samples"; zeros if samples = 0). Rank r answers every world_size-th problem; problem i's
    samples come from group_generators(seed, HELDOUT_STEP, i, ...), so every run and both passes draw
    the same noise, and two passes can be compared problem by problem (paired_gain)."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    mine = list(range(rank, len(problems), world_size))
    prompts, answers = [problems[i][0] for i in mine], [problems[i][1] for i in mine]
    greedy = [group[0] for group in rollout(model, prompts, [[None]] * len(prompts), max_new_tokens, GREEDY,
                                            tokenizer.eos_id, chunk_rows)]
    generators = [group_generators(seed, HELDOUT_STEP, i, samples, device) for i in mine]
    sampled = rollout(model, prompts, generators, max_new_tokens, sampling, tokenizer.eos_id, chunk_rows) \
        if samples else [[]] * len(mine)
    right = lambda completions, answer: sum(math_reward(tokenizer.decode(c), answer) for c in completions)
    scores = torch.zeros(2, len(problems), dtype=torch.float64, device=device)
    for i, answer, first, group in zip(mine, answers, greedy, sampled):
        scores[0, i], scores[1, i] = right([first], answer), right(group, answer) / max(samples, 1)
    if world_size > 1:
        dist.all_reduce(scores)  # each problem's column is filled by one rank, zeros elsewhere
    return scores


def paired_gain(before, after):
    """How much after's mean exceeds before's, scores of the same problems: -> (mean difference, its standard
    error = std of the per-problem differences / sqrt(problems), None for a single problem). Pairing takes
    out how hard each problem is."""
    difference = after - before
    se = (difference.std() / len(difference) ** 0.5).item() if len(difference) > 1 else None
    return difference.mean().item(), se


def heldout_report(step, scores, before, samples, what, temperature):
    """A held-out pass's log.jsonl record and terminal line: the accuracies (greedy, and sampled unless
    samples = 0) and, given an earlier pass (`before`: its scores and step; a resumed run's first pass is
    at the step it resumed from), the gains over it with their paired standard errors."""
    record, parts = {'step': step}, []
    if before is not None:
        before, since_step = before
        record['heldout_gain_since_step'] = since_step
    kinds = [('heldout', 0, 'greedy')] + ([('heldout_sampled', 1, 'sampled')] if samples else [])
    for name, row, kind in kinds:
        record[f'{name}_accuracy'] = scores[row].mean().item()
        parts.append(f"{kind} {record[f'{name}_accuracy']:.1%}")
        if before is not None:
            gain, se = paired_gain(before[row], scores[row])
            record.update({f'{name}_gain': gain, f'{name}_gain_se': se})
            parts[-1] += f" ({100 * gain:+.1f}" + (f" ± {100 * se:.1f}" if se is not None else "") + " points, paired)"
    since = f"; gains since step {since_step}" if before is not None else ""
    line = f"held-out accuracy at step {step} ({what}): " + ", ".join(parts) + since
    return record, line + (f"; sampled = mean of {samples} at temperature {temperature}" if samples else "")


def rollout_stats(rewards, groups, device):
    """The step's rollouts over every rank: mean reward, the fraction of groups whose rewards are all
    equal (no signal), mean response length in tokens."""
    sums = torch.tensor([rewards.sum().item(), rewards.numel(), (rewards.std(dim=1) == 0).sum().item(),
                         sum(len(c) for group in groups for c in group)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    reward_sum, n, all_equal, length_sum = sums.tolist()
    return {'reward': reward_sum / n, 'all_equal_groups': all_equal * rewards.shape[1] / n, 'response_len': length_sum / n}


def check_settings(config, world_size):
    """Settings (config: this script's, by name) that cannot work, found before anything is read or written."""
    group_size, eval_samples, prompts_per_step, mini_batches, max_new_tokens, block_size, init_from = (
        config[k] for k in ('group_size', 'eval_samples', 'prompts_per_step', 'mini_batches', 'max_new_tokens',
                            'block_size', 'init_from'))
    if group_size < 2:
        raise UsageError(f"group_size={group_size}: GRPO needs at least 2 completions per prompt "
                         f"(each is compared with its group's mean)")
    try:
        Sampling(config['temperature'], top_p=config['top_p'])
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not (isinstance(config['rollout_rows'], int) and config['rollout_rows'] >= 1):
        raise UsageError(f"rollout_rows={config['rollout_rows']!r}: the completions generated at once, an integer >= 1")
    if eval_samples < 0:
        raise UsageError(f"eval_samples={eval_samples}: must be 0 (greedy only) or more")
    if prompts_per_step % (mini_batches * world_size):
        raise UsageError(f"prompts_per_step={prompts_per_step} must be a multiple of mini_batches x world_size "
                         f"= {mini_batches} x {world_size}")
    if max_new_tokens >= block_size:
        raise UsageError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in block_size={block_size}")
    if not (os.path.exists(init_from) or is_hub_id(init_from)):
        raise UsageError(f"init_from={init_from}: no such file or directory (the demo trains the arithmetic model: "
                         f"run `python sft.py --dataset=arithmetic --out_dir=out/sft_arithmetic` first)")


def main(rank, world_size, device):
    t_start = time.time()
    config = {k: globals()[k] for k in config_keys}
    check_settings(config, world_size)
    sampling = Sampling(temperature, top_p=top_p)  # how rollouts draw (in range: check_settings)
    resume_path = find_checkpoint(resume, out_dir)  # the reference is init_from's weights even when resuming
    args, init_state, tokenizer_spec = starting_weights(init_from, rank, world_size)
    if resume_path and checkpoint_meta(resume_path)['model_args'] != asdict(args):
        raise UsageError(f"{resume_path} holds a model of another shape than init_from={init_from}")
    tokenizer = chat_tokenizer(tokenizer_spec, args, block_size)
    check_hf_export(tokenizer, export_hf)

    # ---- the problems, in full, before anything is built or written
    prompts, too_long = load_prompts(dataset, tokenizer, block_size - max_new_tokens, at_least=prompts_per_step)
    heldout = load_prompts(eval_dataset, tokenizer, block_size - max_new_tokens)[0][:eval_limit] if eval_dataset else []
    loader = PromptLoader(len(prompts), prompts_per_step, rank, world_size, seed)

    # ---- policy, frozen reference, rollout copy, optimizer, and where the run stands
    # (loading a state dict under FSDP puts shards in place of its entries: each model gets its own dict)
    policy = build_model(args, device, seed, dict(init_state), compile, activation_checkpointing)
    reference = build_reference(args, device, seed, dict(init_state)) if kl_coef else None
    del init_state
    rollout_model = build_rollout_model(args, device)
    optimizer = build_optimizer(policy, lr, weight_decay, betas, eps, device)
    run = Run(out_dir, {'model_args': asdict(args), 'tokenizer': tokenizer.spec, 'config': config},
              log_interval, ckpt_interval, keep_last)
    if rank == 0:
        print(describe_model(policy, f"resumed from {resume_path}" if resume_path else f"init from {init_from}",
                             world_size, device))
        print(f"data: {dataset}: {len(prompts):,} problems, {too_long:,} skipped: longer than block_size - "
              f"max_new_tokens = {block_size - max_new_tokens} tokens; {loader.steps_per_epoch} steps per epoch\n"
              f"step: {prompts_per_step} prompts x {group_size} completions over {world_size} rank(s), "
              f"{ppo_epochs} x {mini_batches} optimizer steps; {max_steps} steps")
    run.start(policy, optimizer, loader, resume_path, max_steps, 'grpo')

    def heldout_pass(before=None):
        sync_rollout_model(policy, rollout_model)
        scores = heldout_scores(rollout_model, heldout, tokenizer, seed, max_new_tokens, eval_samples, sampling,
                                rollout_rows)
        run.log(*heldout_report(run.step, scores, before, eval_samples, f"{len(heldout)} of {eval_dataset}", temperature))
        return scores, run.step

    before = heldout_pass() if heldout else None
    loss_fn = partial(grpo_loss, clip_eps=clip_eps, kl_coef=kl_coef)
    # ---- the loop
    while run.step < max_steps:
        step_lr = lr_at(run.step, lr, warmup_steps, max_steps, min_lr_ratio)
        t0 = time.perf_counter()
        rewind = partial(loader.load_state_dict, loader.state_dict())  # a stop signal within the step drops it
        indices, slots = zip(*loader.next_prompts())
        step_prompts = [prompts[i][0] for i in indices]
        # 1. rollout: group_size samples of each prompt from the policy as it is now
        sync_rollout_model(policy, rollout_model)
        generators = [group_generators(seed, run.step, s, group_size, device) for s in slots]
        groups = rollout(rollout_model, step_prompts, generators, max_new_tokens, sampling, tokenizer.eos_id,
                         rollout_rows, after_chunk=partial(run.stop_if_signalled, rewind=rewind))
        # 2. reward: r_i = 1 if the last \boxed{} of completion i is the answer, else 0
        rewards = torch.tensor([[math_reward(tokenizer.decode(c), prompts[i][1]) for c in group]
                                for i, group in zip(indices, groups)])
        # 3. advantages: A_i = (r_i - mean(r)) / (std(r) + eps) within each group
        advantages = group_advantages(rewards, adv_eps)
        minis = [[with_logprobs(policy, reference, micro, device) for micro in mini]
                 for mini in mini_batches_of(step_prompts, slots, groups, advantages, tokenizer.eos_id,
                                             prompts_per_step, mini_batches, micro_batch_tokens)]
        rollout_seconds = time.perf_counter() - t0
        # 4. loss: clipped surrogate + kl_coef * k3, per response token (grpo_loss); ppo_epochs x mini_batches steps
        stats = update(policy, optimizer, minis, loss_fn, step_lr, ppo_epochs, grad_clip)
        stats.update(rollout_stats(rewards, groups, device), rollout_s=rollout_seconds,
                     seconds=stats['seconds'] + rollout_seconds)
        run.end_step(stats, step_lr)

    if heldout:
        heldout_pass(before)
    run.finish(tokenizer, with_hf=export_hf)
    if rank == 0:
        print(f"done: {run.step} steps in {time.time() - t_start:.0f}s; wrote {out_dir}/final.pt. "
              f"Try: python sample.py --ckpt {out_dir}/final.pt --chat")


if __name__ == '__main__':
    launch(main, globals(), config_keys)
