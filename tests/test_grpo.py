"""grpo.py on CPU: advantages, the loss and its gradient checked by hand, sampling, then real runs as
subprocesses (one process, torchrun, kill and resume, bad input) with a tiny model first taught to
answer small sums as \\boxed{N} with Mistral's real 32k tokenizer."""
import copy
import json
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import chats  # noqa: E402
import grpo  # noqa: E402  (importing it runs nothing: the run is under __main__)
import trainer  # noqa: E402
from tasks.math_grader import math_reward  # noqa: E402
from model import Sampling, Transformer, generate, model_args  # noqa: E402
from tokenizer import Tokenizer, encode_chat  # noqa: E402
from training_runs import ENV, ROOT, assert_one_line_errors, start, tree_digest, wait_for, write_jsonl  # noqa: E402
from weights import load_model, save_checkpoint  # noqa: E402

SUMS = [(f"What is {a} + {b}?", str(a + b)) for a in range(1, 5) for b in range(1, 5)]
LONG = ('What is ' + ' + '.join(['1'] * 30) + '?', '30')  # longer than block_size - max_new_tokens: skipped
# 4 prompts x 4 completions a step, 2 epochs x 2 mini-batches of updates (so ratios move off 1 and clip);
# one micro-batch = one group, so 2 ranks see the very same micro-batches (and padded tokens) as 1 process
ARGS = ['--block_size=64', '--max_new_tokens=8', '--prompts_per_step=4', '--group_size=4', '--micro_batch_tokens=256',
        '--ppo_epochs=2', '--mini_batches=2', '--lr=3e-3', '--kl_coef=0.05', '--max_steps=6', '--ckpt_interval=3',
        '--log_interval=1', '--eval_limit=8', '--seed=5']
LOGGED = ('reward', 'all_equal_groups', 'response_len', 'loss', 'kl', 'clip_frac', 'grad_norm', 'lr', 'tokens')


@pytest.fixture(scope='module')
def mistral():
    return Tokenizer.load('mistral')


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(model_args('tiny', **overrides))
    model.init_weights()
    return model


@pytest.fixture(scope='module')
def sums_model(mistral, tmp_path_factory):
    """A tiny model with the 32k vocabulary, fine-tuned for 40 steps on SUMS asked as grpo.py asks
    them: it writes \\boxed{N}, right about a quarter of the time, so rewards differ within a group."""
    conversations = [chats.math_prompt(p) + [{'role': 'assistant', 'content': f"\\boxed{{{a}}}"}] for p, a in SUMS]
    encoded = [encode_chat(mistral, c) for c in conversations]
    T = max(len(ids) for ids, _ in encoded) - 1
    x, y = torch.full((len(encoded), T), mistral.eos_id), torch.full((len(encoded), T), -1)
    for r, (ids, mask) in enumerate(encoded):
        ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        x[r, :len(ids) - 1], y[r, :len(ids) - 1] = ids[:-1], torch.where(mask[1:], ids[1:], -1)
    model = tiny_model(vocab_size=32000, sliding_window=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        model(x, targets=y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp('init') / 'sums.pt'
    save_checkpoint(str(path), model, 'mistral')
    return path


@pytest.fixture(scope='module')
def problems(tmp_path_factory):
    rows = [{'problem': p, 'answer': a} for p, a in SUMS[:8] + [LONG] + SUMS[8:]]
    return write_jsonl(tmp_path_factory.mktemp('data') / 'sums.jsonl', rows)


def records(out_dir):
    """{step: record} of the training steps in log.jsonl (a step replayed after a kill keeps its last
    record), and the held-out passes' records in order."""
    lines = [json.loads(line) for line in open(Path(out_dir) / 'log.jsonl')]
    return {r['step']: r for r in lines if 'loss' in r}, [r for r in lines if 'heldout_accuracy' in r]


def run(args, out_dir, nproc=0, wait=True):
    return start('grpo.py', [*args, f'--out_dir={out_dir}'], nproc, wait=wait)


@pytest.fixture(scope='module')
def reference(sums_model, problems, tmp_path_factory):
    out = tmp_path_factory.mktemp('reference')
    rc, stdout, stderr = run([f'--init_from={sums_model}', f'--dataset={problems}', f'--eval_dataset={problems}',
                              *ARGS], out)
    assert rc == 0, stderr
    return out, stdout, records(out)


# ----------------------------------------------------------------------------- the algorithm, by hand

@pytest.mark.concept
def test_group_advantages_by_hand():
    rewards = torch.tensor([[1., 0., 0., 1.], [1., 1., 1., 1.], [0., 0., 0., 0.], [1., 0., 0., 0.]])
    a = grpo.group_advantages(rewards, eps=1e-6)
    # group 0: mean 1/2, unbiased std sqrt(4 * (1/2)^2 / 3) = 1/sqrt(3); group 3: mean 1/4, std 1/2
    s0 = 1 / math.sqrt(3)
    assert a[0].tolist() == pytest.approx([0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), 0.5 / (s0 + 1e-6)])
    assert a[3].tolist() == pytest.approx([0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3)
    assert a[1].tolist() == a[2].tolist() == [0.0] * 4  # all equal: no signal, exactly zero


@pytest.mark.concept
def test_loss_by_hand_with_clipping_on_both_sides():
    # two completions, three positions; the last position of row 1 is padding
    ratio = [[1.5, 0.9, 1.0], [0.5, 1.1, 7.0]]
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0]])
    logp = old + torch.tensor(ratio).log()
    ref = torch.tensor([[-1.2, -1.5, -0.5], [-0.1, -1.3, -0.2]])
    adv, mask = torch.tensor([1.0, -2.0]), torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    loss, tokens, metrics = grpo.policy_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    # -min(r A, clip(r) A): row 0 (A = 1) at r = 1.5 takes the clip 1.2; row 1 (A = -2) at r = 0.5 takes 0.8
    surrogate = [-1.2, -0.9, -1.0, 2 * 0.8, 2 * 1.1]
    k3 = [math.exp(d) - d - 1 for d in (ref - logp)[mask].tolist()]
    assert tokens.item() == 5
    assert loss.item() == pytest.approx(sum(surrogate) + 0.1 * sum(k3), rel=1e-6)
    assert metrics['clip_frac'].item() == 2 and metrics['kl'].item() == pytest.approx(sum(k3), rel=1e-6)


def completions_of(prompts, lengths, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in group] for group in lengths]


@pytest.mark.concept
def test_gradient_is_reinforce_with_group_baseline():
    """One update per rollout: ratio = 1, nothing is clipped, and the gradient of the loss is
    -(1/N) sum_i A_i sum_t grad log pi(o_t), N the step's response tokens, computed here directly."""
    model = tiny_model()
    prompts = [[1, 5, 9], [1, 7, 7, 2, 4]]
    groups = completions_of(prompts, [[4, 2, 5], [3, 3, 1]])
    advantages = grpo.group_advantages(torch.tensor([[1., 0., 1.], [0., 0., 1.]]))
    batch = grpo.with_logprobs(model, None, grpo.collate(
        [(p, c, a) for p, g, adv in zip(prompts, groups, advantages.tolist()) for c, a in zip(g, adv)], pad_id=0), 'cpu')
    loss, tokens, _ = grpo.grpo_loss(model, batch, clip_eps=0.2, kl_coef=0.0)
    (loss / tokens).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    objective, n = 0.0, 0
    for p, group, adv in zip(prompts, groups, advantages.tolist()):
        for c, a in zip(group, adv):
            log_probs = torch.log_softmax(model(torch.tensor([p + c]))[0][0].double(), -1)
            objective = objective + a * sum(log_probs[len(p) - 1 + t, tok] for t, tok in enumerate(c))
            n += len(c)
    (-objective / n).backward()
    assert tokens.item() == n
    for a, b in zip(ours, model.parameters()):
        assert torch.allclose(a, b.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.concept
def test_kl_and_its_gradient_vanish_when_policy_is_the_reference():
    model = tiny_model()
    reference = copy.deepcopy(model)
    rows = [([1, 5, 9], [4, 8, 15], 0.0), ([2, 6], [16, 23, 42, 3], 0.0)]  # zero advantages: only the KL term is left
    batch = grpo.with_logprobs(model, reference, grpo.collate(rows, pad_id=0), 'cpu')
    loss, tokens, metrics = grpo.grpo_loss(model, batch, clip_eps=0.2, kl_coef=0.5)
    loss.backward()
    assert loss.item() == 0 and metrics['kl'].item() == 0
    assert all(p.grad.abs().max() == 0 for p in model.parameters())
    # and away from the reference it is positive, with a gradient
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
    loss, _, metrics = grpo.grpo_loss(model, batch, clip_eps=0.2, kl_coef=0.5)
    assert metrics['kl'].item() > 0 and loss.item() > 0


def test_step_0_is_on_policy_in_reduced_precision(monkeypatch):
    """pi_old and pi_ref are computed in the precision of the training forward: under bf16 autocast
    (what one CUDA GPU trains in, emulated on the CPU), the first update of a step sees a ratio of
    exactly 1 (nothing clipped) and a KL of exactly 0 to a reference that equals the policy."""
    bf16 = lambda device: torch.autocast('cpu', dtype=torch.bfloat16)
    monkeypatch.setattr(grpo, 'autocast_context', bf16)
    monkeypatch.setattr(trainer, 'autocast_context', bf16)
    model = tiny_model()
    rows = [([1, 5, 9], [4, 8, 15], 1.0), ([2, 6], [16, 23, 42, 3], -1.0)]
    batch = grpo.with_logprobs(model, copy.deepcopy(model), grpo.collate(rows, pad_id=0), 'cpu')
    fp32_old = model.token_logprobs(*batch[:2])
    assert (batch[3] - fp32_old).abs().max() > 1e-4  # bf16 differs from fp32: the test can tell them apart
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = trainer.train_step(model, optimizer, [batch], lambda m, b: grpo.grpo_loss(m, b, 0.2, 0.5), 0.0, 1.0)
    assert stats['kl'] == 0 and stats['clip_frac'] == 0
    # the loss is then -mean(A * ratio) with ratio = 1: the advantage-weighted token mean
    assert stats['loss'] == pytest.approx(-(1.0 * 3 - 1.0 * 4) / 7)


def test_micro_batches_by_tokens_change_nothing_but_memory():
    """Packing a step's completions into micro-batches of at most N padded tokens gives the loss,
    the gradient (hence the update) and every logged number of one big batch."""
    lengths = [(3, 9), (5, 2), (2, 14), (4, 4), (6, 1), (1, 7)]
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(1, 256, (p,), generator=g).tolist(), torch.randint(1, 256, (c,), generator=g).tolist(),
             float(i % 3) - 1.0) for i, (p, c) in enumerate(lengths)]
    packed = grpo.micro_batches(rows, max_tokens=24, pad_id=0)  # lengths 15 | 11 7 | 7 6 6
    assert len(packed) == 3 and all(x.numel() <= 24 for x, _, _ in packed)
    results = []
    for micro in ([grpo.collate(rows, pad_id=0)], packed):
        model = tiny_model()
        reference = tiny_model(seed=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        batches = [grpo.with_logprobs(model, reference, mb, 'cpu') for mb in micro]
        stats = trainer.train_step(model, optimizer, batches, lambda m, b: grpo.grpo_loss(m, b, 0.2, 0.5), 1.0, 10.0)
        results.append((stats, [p.detach().clone() for p in model.parameters()]))
    (one, after_one), (many, after_many) = results
    assert one['tokens'] > many['tokens']  # the padding left out
    for key in ('loss', 'kl', 'clip_frac', 'grad_norm'):
        assert many[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(after_one, after_many))


def test_padded_and_finished_rows_carry_no_loss():
    """A row that ended early (EOS) is padded: the padding is not a target, so neither its ids nor
    anything the model says there changes the loss or its gradient."""
    eos = 2
    rows = [([1, 5], [4, 8, 15, 16, 23, eos], 1.0), ([1, 9, 9, 9], [42, eos], -1.0)]
    x, y, adv = grpo.collate(rows, pad_id=eos)
    assert x.tolist() == [[1, 5, 4, 8, 15, 16, 23], [1, 9, 9, 9, 42, eos, eos]]
    assert y.tolist() == [[-1, 4, 8, 15, 16, 23, eos], [-1, -1, -1, 42, eos, -1, -1]]
    results = []
    for pad in (eos, 77):
        model = tiny_model()
        batch = grpo.with_logprobs(model, None, grpo.collate(rows, pad_id=pad), 'cpu')
        # the sampling-time log-probs of the padding can be anything: they must not matter either
        batch = batch[:3] + (batch[3] + (batch[1] == -1) * 5.0 * (pad == 77), batch[4])
        loss, tokens, _ = grpo.grpo_loss(model, batch, clip_eps=0.2, kl_coef=0.0)
        loss.backward()
        results.append((loss.item(), tokens.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][:2] == pytest.approx(results[1][:2]) and results[0][1] == 8
    assert all(torch.allclose(a, b) for a, b in zip(results[0][2], results[1][2]))


def test_sampling_is_reproducible_and_does_not_depend_on_the_ranks_or_the_chunks():
    """Completion j of the prompt in slot s draws from its own generator (seed, step, s, j): the same
    completions whether the step's rows are generated all at once, a few at a time, one group per
    call, or split over ranks."""
    model = tiny_model()
    prompts = [[1, 5, 9], [1, 7], [3, 3, 3, 3], [8]]

    def sample(step, slots, chunk_rows=12):  # 3 completions of at most 6 tokens each, at temperature 1, no EOS
        generators = [grpo.group_generators(11, step, s, 3, 'cpu') for s in slots]
        return grpo.rollout(model, [prompts[s] for s in slots], generators, 6, Sampling(1.0), None, chunk_rows)
    whole = sample(4, [0, 1, 2, 3])
    assert all(len(c) == 6 for group in whole for c in group)
    assert whole == sample(4, [0, 1, 2, 3])
    assert all(sample(4, [0, 1, 2, 3], chunk_rows=n) == whole for n in (1, 2, 3, 5, 64))
    assert [sample(4, [s])[0] for s in range(4)] == whole  # one group per call
    assert sample(4, [0, 2]) + sample(4, [1, 3]) == [whole[0], whole[2], whole[1], whole[3]]  # as 2 ranks split them
    assert sample(5, [0, 1, 2, 3]) != whole
    assert len(set(map(tuple, whole[0]))) > 1  # the samples of one group differ


def test_rows_that_finish_early_leave_the_others_unchanged(sums_model, mistral):
    """Rows stopping at EOS at different steps (finished rows stay in the batch until at most half
    are left, then leave it) make the tokens each row makes alone."""
    model = load_model(str(sums_model))[0]
    prompts = [encode_chat(mistral, chats.math_prompt(p), add_generation_prompt=True)[0] for p, _ in SUMS[:6]]
    generators = lambda rows: [grpo.group_generators(3, 0, r, 2, 'cpu') for r in rows]
    sample = lambda rows: grpo.rollout(model, [prompts[r] for r in rows], generators(rows), 12, Sampling(1.0),
                                       mistral.eos_id, chunk_rows=12)
    together = sample(range(6))
    lengths = [len(c) for group in together for c in group]
    assert len(set(lengths)) > 2 and lengths.count(12) < len(lengths), lengths  # ended at different steps
    assert together == [sample([r])[0] for r in range(6)]


def test_a_learnable_reward_rises():
    """The whole step (rollout, advantages, mini-batches, old log-probs, update) on a tiny random
    model, rewarded 1 when its first new token is even: about half at first, most of them soon."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    loss_fn = lambda m, b: grpo.grpo_loss(m, b, clip_eps=0.2, kl_coef=0.0)
    prompts, mean_rewards = [[1, 5, 9], [1, 7], [3, 3, 3, 3], [8]], []
    for step in range(10):
        # 8 completions of one token each, at temperature 1
        groups = grpo.rollout(model, prompts, [grpo.group_generators(0, step, p, 8, 'cpu') for p in range(4)], 1,
                              Sampling(1.0), None, chunk_rows=32)
        rewards = torch.tensor([[float(c[0] % 2 == 0) for c in group] for group in groups])
        minis = grpo.mini_batches_of(prompts, range(4), groups, grpo.group_advantages(rewards), 0, prompts_per_step=4,
                                     mini_batches=1, micro_batch_tokens=4096)
        grpo.update(model, optimizer, [[grpo.with_logprobs(model, None, mb, 'cpu') for mb in mini] for mini in minis],
                    loss_fn, 3e-2, ppo_epochs=1, grad_clip=1.0)
        mean_rewards.append(rewards.mean().item())
    assert sum(mean_rewards[:3]) / 3 < 0.7 and sum(mean_rewards[-3:]) / 3 > 0.9, mean_rewards


def test_heldout_scores_greedy_and_sampled(sums_model, mistral):
    model = load_model(str(sums_model))[0]
    problems = [(encode_chat(mistral, chats.math_prompt(p), add_generation_prompt=True)[0], a) for p, a in SUMS]
    one_by_one = [math_reward(mistral.decode(generate(model, [p], 8, eos_id=mistral.eos_id)[0]), a) for p, a in problems]
    # seed 3, 8 new tokens, 3 samples each at temperature / top_p
    scores = lambda samples, temperature: grpo.heldout_scores(model, problems, mistral, 3, 8, samples,
                                                              Sampling(temperature), chunk_rows=20)
    at_1 = scores(3, 1.0)
    assert at_1[0].tolist() == one_by_one and 0 < sum(one_by_one) < 16
    assert set((at_1[1] * 3).tolist()) <= {0, 1, 2, 3} and torch.equal(scores(3, 1.0), at_1)
    assert torch.equal(scores(3, 0.0)[1], at_1[0])  # at temperature 0 every sample is the greedy answer
    assert not scores(0, 1.0)[1].any()


def test_paired_gain_by_hand():
    before, after = torch.tensor([0., 1, 0, 1, 0], dtype=torch.float64), torch.tensor([1., 1, 0, 0, 1], dtype=torch.float64)
    # differences 1, 0, 0, -1, 1: mean 0.2, sample variance (0.64 + 0.04 + 0.04 + 1.44 + 0.64) / 4 = 0.7
    gain, se = grpo.paired_gain(before, after)
    assert gain == pytest.approx(0.2) and se == pytest.approx((0.7 / 5) ** 0.5)
    assert grpo.paired_gain(before[:1], after[:1]) == (1.0, None)  # one problem: a gain, no spread to measure


def test_arithmetic_task_is_seeded_graded_and_held_out(mistral):
    train, heldout = list(chats.arithmetic_problems('train')), list(chats.arithmetic_problems('heldout'))
    assert (len(train), len(heldout)) == (800, 200) and train == list(chats.arithmetic_problems('train'))
    name = lambda row: row['problem'].split()[0]
    assert not {name(r) for r in train} & {name(r) for r in heldout}  # no held-out sentence is ever trained on
    work = lambda row: row['messages'][1]['content'].split(' = ')[0]  # "7 + 5"
    facts = {f"{a} + {b}" for a in range(1, 10) for b in range(1, 10)} | \
        {f"{a + b} - {b}" for a in range(1, 10) for b in range(1, 10)} | \
        {f"{a} x {b}" for a in range(2, 10) for b in range(2, 10)}
    assert len(facts) == 226 and {work(r) for r in train + heldout} <= facts
    assert len({work(r) for r in train}) > 200  # nearly every fact is trained on, in other sentences
    for row in train[:50] + heldout[:50]:
        a, op, b = work(row).split()
        assert int(row['answer']) == {'+': int(a) + int(b), '-': int(a) - int(b), 'x': int(a) * int(b)}[op]
        assert math_reward(row['messages'][1]['content'], row['answer']) == 1.0
        assert row['messages'][0]['content'].startswith(row['problem'])
    ids, mask, offsets, skipped = chats.load_conversations('arithmetic', mistral, 256, workers=1)  # sft.py --dataset=arithmetic
    assert len(offsets) - 1 == 800 and sum(skipped.values()) == 0


# ----------------------------------------------------------------------------- real runs

def test_run_logs_rewards_and_heldout_accuracy(reference):
    out, stdout, (steps, accuracy) = reference
    assert '16 problems, 1 skipped: longer than block_size - max_new_tokens' in stdout
    assert sorted(steps) == list(range(1, 7)) and len(accuracy) == 2
    before, after = accuracy
    assert all(0 <= r[key] <= 1 for r in accuracy for key in ('heldout_accuracy', 'heldout_sampled_accuracy'))
    for name in ('heldout', 'heldout_sampled'):  # the gain is after - before; its paired SE is logged beside it
        assert after[f'{name}_gain'] == pytest.approx(after[f'{name}_accuracy'] - before[f'{name}_accuracy'])
        assert after[f'{name}_gain_se'] >= 0 and f'{name}_gain' not in before
    assert after['heldout_gain_since_step'] == before['step'] == 0
    assert 'held-out accuracy at step 6 (8 of ' in stdout and 'sampled' in stdout
    assert all(set(LOGGED) <= set(r) for r in steps.values())
    assert 0 < sum(r['reward'] for r in steps.values()) / 6 < 1  # rewards differ: there is something to learn
    assert any(r['clip_frac'] > 0 for r in steps.values())  # the second epoch moves ratios past the clip
    assert (out / 'final.pt').exists()


def test_torchrun_two_ranks_matches_one_process(reference, sums_model, problems, tmp_path):
    _, _, (expected, accuracy) = reference
    rc, stdout, stderr = run([f'--init_from={sums_model}', f'--dataset={problems}', f'--eval_dataset={problems}',
                              *ARGS], tmp_path, nproc=2)
    assert rc == 0 and 'FSDP2' in stdout, stderr[-3000:]
    steps, fsdp_accuracy = records(tmp_path)
    assert fsdp_accuracy == accuracy and sorted(steps) == sorted(expected)
    for step, record in steps.items():
        for key in LOGGED:
            assert record[key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_kill_then_resume_continues_with_the_same_rollouts(reference, sums_model, problems, tmp_path):
    _, _, (expected, _) = reference
    # held-out passes use their own generators and change no training step: skipped here to save time,
    # the steps still match the reference run's
    args = [f'--init_from={sums_model}', f'--dataset={problems}', '--eval_dataset=', *ARGS]
    p = run(args, tmp_path, wait=False)
    wait_for(lambda: (tmp_path / 'log.jsonl').exists() and max(records(tmp_path)[0], default=0) >= 4, p, timeout=240)
    p.kill()
    p.communicate()
    assert not (tmp_path / 'final.pt').exists(), "the run ended before the kill; nothing was tested"
    rc, stdout, stderr = run(args, tmp_path)
    assert rc == 0, stderr
    assert 'resumed from' in stdout and 'step_00000003' in stdout
    steps = records(tmp_path)[0]
    assert sorted(steps) == sorted(expected)
    for step, record in steps.items():  # the same rollouts and updates, bit for bit (all but the timings)
        assert {k: record[k] for k in LOGGED} == {k: expected[step][k] for k in LOGGED}, step


def test_a_stop_signal_during_the_rollouts_saves_the_last_finished_step(reference, sums_model, problems, tmp_path):
    """SIGTERM is acted on between rollout chunks (here 16 generate() calls a step, most of its time),
    or at the end of a step: either way the run saves the last finished step, and resuming repeats
    the dropped step with the same rollouts: every logged number as in an uninterrupted run."""
    _, _, (expected, _) = reference
    args = [f'--init_from={sums_model}', f'--dataset={problems}', '--eval_dataset=', *ARGS,
            '--rollout_rows=1']  # the same completions as the reference's, which generates 16 at once
    p = run(args, tmp_path, wait=False)
    wait_for(lambda: (tmp_path / 'log.jsonl').exists() and max(records(tmp_path)[0], default=0) >= 2, p, timeout=240)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 128 + signal.SIGTERM, err
    stopped = int(re.search(r'stopped by signal 15 at step (\d+)', out).group(1))
    assert (tmp_path / 'checkpoints' / f'step_{stopped:08d}' / 'meta.json').exists() and stopped < 6
    rc, stdout, stderr = run(args, tmp_path)
    assert rc == 0 and f'step_{stopped:08d}' in stdout, stderr
    steps = records(tmp_path)[0]
    assert sorted(steps) == sorted(expected)
    for step, record in steps.items():
        assert {k: record[k] for k in LOGGED} == {k: expected[step][k] for k in LOGGED}, step


def test_bad_input_stops_with_one_line_and_loses_nothing(reference, sums_model, problems, tmp_path):
    out, _, _ = reference
    finished = tmp_path / 'finished'
    shutil.copytree(out, finished)  # a finished run's out_dir: none of the failed runs may touch it
    before = tree_digest(finished)
    good = {'problem': 'What is 1 + 1?', 'answer': '2'}
    cases = [  # (the error, the .jsonl rows, more arguments)
        ("{data}:2: no 'answer' field", [good, {'problem': 'What is 2 + 2?'}], []),
        ("{data}:3: the grader (tasks.math_grader.math_reward) cannot match answer '{{7' even to itself",
         [good, good, {'problem': 'What is 3 + 4?', 'answer': '{7'}], []),
        ("group_size=1: GRPO needs at least 2 completions per prompt", [good] * 8, ['--group_size=1']),
        ("eval_samples=-2: must be 0 (greedy only) or more", [good] * 8, ['--eval_samples=-2']),
        ("0 usable problems (1 skipped: longer than block_size - max_new_tokens = 56 tokens)",
         [{'problem': LONG[0], 'answer': LONG[1]}], []),
    ]
    procs = {}
    for n, (expected, rows, extra) in enumerate(cases):
        data = write_jsonl(tmp_path / f'bad{n}.jsonl', rows)
        procs[expected.format(data=data)] = subprocess.Popen(
            [sys.executable, 'grpo.py', f'--init_from={sums_model}', f'--dataset={data}', '--eval_dataset=', *ARGS,
             f'--out_dir={finished}', *extra], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs["init_from=out/none.pt: no such file or directory (the demo trains the arithmetic model: run "
          "`python sft.py --dataset=arithmetic --out_dir=out/sft_arithmetic` first)"] = subprocess.Popen(
        [sys.executable, 'grpo.py', '--init_from=out/none.pt', f'--out_dir={tmp_path / "new"}'],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert_one_line_errors(procs)
    assert tree_digest(finished) == before
    assert not (tmp_path / 'new').exists()


def test_deepscaler_config_parses():
    """config/grpo_deepscaler.py sets only grpo.py's settings, with their types (it needs GPUs and the hub to run)."""
    from configurator import apply_overrides
    settings = {k: getattr(grpo, k) for k in grpo.config_keys}
    apply_overrides(settings, grpo.config_keys, ['config/grpo_deepscaler.py'])
    assert (settings['prompts_per_step'], settings['group_size'], settings['lr'], settings['kl_coef']) == (128, 8, 1e-6, 0.001)
    assert settings['prompts_per_step'] % (settings['mini_batches'] * 8) == 0  # fits torchrun --nproc_per_node=8


def test_rollout_model_follows_the_policy():
    """Each step's rollouts come from the policy's current weights: nothing the rollout copy keeps
    between steps may go stale after a sync (sync_rollout_model copies one tensor at a time)."""
    policy = tiny_model()
    rollout_model = grpo.build_rollout_model(policy.args, torch.device('cpu'))
    # 2 greedy completions of 5 tokens: a random model's near-uniform sampling would hide changes
    sample = lambda model: grpo.rollout(model, [[1, 5, 9]], [[None, None]], 5, Sampling(0.0), None, chunk_rows=2)
    samples = []
    for _ in range(2):
        grpo.sync_rollout_model(policy, rollout_model)
        samples.append(sample(rollout_model))
        assert samples[-1] == sample(copy.deepcopy(policy))
        with torch.no_grad():
            policy.tok_embeddings.weight.mul_(-1.5)  # the tied head too: an update the next sync must carry
    assert samples[0] != samples[1]
