"""sft.py on CPU: the batches and their loss checked by hand, then real runs as subprocesses
(fine-tune, chat with sample.py, kill and resume, torchrun, bad input) with a tiny model
that uses Mistral's real 32k tokenizer."""
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trainer  # noqa: E402
import chats as chat_data  # noqa: E402
from dataloader import ChatLoader  # noqa: E402  (importing it runs nothing: the run is under __main__)
from training_runs import ENV, ROOT, assert_one_line_errors, assert_same_numbers, logged_numbers, losses, start, tree_digest, wait_for  # noqa: E402
from tokenizer import Tokenizer, encode_chat  # noqa: E402
from model import Transformer, model_args  # noqa: E402
from weights import save_checkpoint  # noqa: E402


# what the tiny model learns by heart; the sample test asks some of the first user turns again
CHATS = [
    [dict(role='user', content='What is the capital of France?'), dict(role='assistant', content='Paris is the capital of France.')],
    [dict(role='system', content='Answer in one word.'), dict(role='user', content='Which colour is the sky?'),
     dict(role='assistant', content='Blue.'), dict(role='user', content='And grass?'), dict(role='assistant', content='Green.')],
    [dict(role='user', content='Say hello in Italian.'), dict(role='assistant', content='Ciao!')],
    [dict(role='user', content='How many legs does a spider have?'), dict(role='assistant', content='A spider has eight legs.')],
    [dict(role='user', content='Name a prime number.'), dict(role='assistant', content='Seven is prime.')],
    [dict(role='user', content='What do bees make?'), dict(role='assistant', content='Bees make honey.')],
]
SKIPPED = [
    [dict(role='system', content='No reply follows.'), dict(role='user', content='Hello?')],  # no assistant turn
    [dict(role='user', content='word ' * 100), dict(role='assistant', content='Too late.')],  # reply beyond block_size
]
# batch 1 x accumulation 2: the torchrun test gets the same steps from batch 1 on each of 2 ranks
ARGS = ['--block_size=64', '--batch_size=1', '--grad_accum=2', '--epochs=30', '--lr=3e-3', '--warmup_ratio=0.05',
        '--log_interval=1', '--ckpt_interval=30', '--keep_last=2', '--seed=3']
STEPS = 90  # 6 conversations / 2 per step x 30 epochs


@pytest.fixture(scope='module')
def mistral():
    return Tokenizer.load('mistral')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A random small model with the full Mistral vocabulary, saved as this project's checkpoint
    (the 'tiny' preset, wide enough to learn six conversations by heart in 90 steps)."""
    path = tmp_path_factory.mktemp('init') / 'tiny.pt'
    torch.manual_seed(0)
    model = Transformer(model_args('tiny', vocab_size=32000, dim=128, hidden_dim=256, sliding_window=32))
    model.init_weights()
    save_checkpoint(str(path), model, 'mistral')
    return path


def write_jsonl(path, conversations):
    path.write_text(''.join(json.dumps({'id': i, 'messages': m}) + '\n' for i, m in enumerate(conversations)))
    return path


@pytest.fixture(scope='module')
def chats(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp('data') / 'chats.jsonl', CHATS[:3] + SKIPPED + CHATS[3:])


def run(args, out_dir, nproc=0, wait=True):
    return start('sft.py', [*args, f'--out_dir={out_dir}'], nproc, wait=wait)


@pytest.fixture(scope='module')
def reference(tiny, chats, tmp_path_factory):
    """One uninterrupted fine-tuning run that the other runs are compared against."""
    out = tmp_path_factory.mktemp('reference')
    rc, stdout, stderr = run([f'--init_from={tiny}', f'--dataset={chats}', *ARGS], out)
    assert rc == 0, stderr
    return out, stdout, losses(out)


# ----------------------------------------------------------------------------- batches, by hand

@pytest.mark.concept
def test_targets_cover_exactly_the_assistant_replies(mistral):
    conversation = CHATS[1]  # system, user, assistant, user, assistant
    ids, mask = encode_chat(mistral, conversation)
    short_ids, short_mask = encode_chat(mistral, CHATS[2])
    offsets = [0, len(ids), len(ids) + len(short_ids)]
    loader = ChatLoader(np.array(ids + short_ids), np.array(mask + short_mask, dtype=bool), offsets,
                            batch_size=2)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, len(ids) - 1)  # padded to the longer conversation
    # one row holds the long conversation, unchanged; the targets are the next tokens of its replies only
    r = next(r for r in range(2) if x[r].tolist() == ids[:-1])
    spans, span = [], []
    for target in y[r].tolist() + [-1]:
        if target != -1:
            span.append(target)
        elif span:
            spans, span = spans + [span], []
    assert [s[-1] for s in spans] == [mistral.eos_id] * 2
    assert [mistral.decode(s[:-1]) for s in spans] == ['Blue.', 'Green.']
    # and each reply is trained from the position right after "<|assistant|>\n", where the model reads the tag
    starts = [t for t in range(len(ids) - 1) if y[r, t] != -1 and (t == 0 or y[r, t - 1] == -1)]
    assert len(starts) == 2
    assert all(mistral.decode(ids[:t + 1]).endswith('<|assistant|>\n') for t in starts)
    # the short conversation's row is padded with EOS inputs and ignored targets
    other = 1 - r
    n = len(short_ids) - 1
    assert x[other, :n].tolist() == short_ids[:-1] and (x[other, n:] == 0).all()
    assert (y[other, n:] == -1).all() and mistral.decode([t for t in y[other].tolist() if t != -1][:-1]) == 'Ciao!'


@pytest.mark.concept
def test_loss_is_the_mean_over_assistant_tokens(mistral):
    torch.manual_seed(0)
    model = Transformer(model_args('tiny', vocab_size=32000))
    model.init_weights()
    encoded = [encode_chat(mistral, c) for c in CHATS[:3]]
    flat_ids = [i for ids, _ in encoded for i in ids]
    flat_mask = [m for _, mask in encoded for m in mask]
    offsets = [0]
    for ids, _ in encoded:
        offsets.append(offsets[-1] + len(ids))
    loader = ChatLoader(np.array(flat_ids), np.array(flat_mask, dtype=bool), offsets, batch_size=3)
    x, y = loader.next_batch()
    _, loss = model(x, targets=y)
    # by hand, from encode_chat's ids and mask (not from y): -log p(next token) at each assistant
    # token, averaged over all of them in the batch; the row of each conversation found by content
    logits, _ = model(x)
    total, count = 0.0, 0
    for ids, mask in encoded:
        r = next(r for r in range(3) if x[r, :len(ids) - 1].tolist() == ids[:-1])
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                log_probs = logits[r, t].double() - torch.logsumexp(logits[r, t].double(), dim=0)
                total -= log_probs[ids[t + 1]].item()
                count += 1
    assert count == sum(sum(mask) for _, mask in encoded)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def reduction_batches():
    """Four micro-batches of random tokens with 2, 5, 13 and 24 trained targets: the two
    reductions weigh them differently."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for trained in (2, 5, 13, 24):
        x = torch.randint(0, 64, (2, 16), generator=g)
        y = torch.full((2, 16), -1)
        y.view(-1)[torch.randperm(32, generator=g)[:trained]] = torch.randint(0, 64, (trained,), generator=g)
        batches.append((x, y))
    return batches


def reduction_model():
    """The same weights in one process and, sharded, on every rank (trainer.build_model's CPU path)."""
    return trainer.build_model(model_args('tiny', vocab_size=64), torch.device('cpu'), seed=0)


def by_hand(batches, loss_reduction):
    """The step's loss written out: -log p(target) summed per micro-batch, then divided by all
    trained tokens of the step ('sum') or averaged over the micro-batch means ('mean'); and the
    norm of its gradient."""
    model = reduction_model()
    sums, counts = [], []
    for x, y in batches:
        log_probs = model(x)[0].double().log_softmax(-1)
        trained = y != -1
        sums.append(-log_probs[trained].gather(1, y[trained][:, None]).sum())
        counts.append(int(trained.sum()))
    if loss_reduction == 'sum':
        loss = sum(sums) / sum(counts)
    else:
        loss = sum(s / n for s, n in zip(sums, counts)) / len(batches)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()


def step_stats(batches, loss_reduction):
    """trainer.train_step with sft.py's loss for loss_reduction, lr 0 and no clipping."""
    import sft
    model = reduction_model()
    optimizer = trainer.build_optimizer(model, 0.0, 0.0, (0.9, 0.95), 1e-8, torch.device('cpu'))
    loss_fn = trainer.lm_loss if loss_reduction == 'sum' else sft.batch_mean_lm_loss
    return trainer.train_step(model, optimizer, batches, loss_fn, lr=0.0, grad_clip=1e9)


def reduction_rank(rank, store, out):
    """Rank `rank` of 2 (gloo, FSDP2): micro-batches rank, rank + 2 of reduction_batches()."""
    torch.distributed.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    import sft
    model = reduction_model()
    results = {}
    for loss_reduction in ('sum', 'mean'):
        optimizer = trainer.build_optimizer(model, 0.0, 0.0, (0.9, 0.95), 1e-8, torch.device('cpu'))
        loss_fn = trainer.lm_loss if loss_reduction == 'sum' else sft.batch_mean_lm_loss
        stats = trainer.train_step(model, optimizer, reduction_batches()[rank::2], loss_fn, lr=0.0, grad_clip=1e9)
        results[loss_reduction] = (stats['loss'], stats['grad_norm'])
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


@pytest.mark.concept
def test_loss_reduction_sum_weighs_every_token_and_mean_every_micro_batch(tmp_path):
    batches = reduction_batches()
    expected = {r: by_hand(batches, r) for r in ('sum', 'mean')}
    assert expected['sum'][0] != pytest.approx(expected['mean'][0], rel=1e-3)  # the test tells them apart
    for loss_reduction, (loss, grad_norm) in expected.items():  # one process, 4 micro-batches
        stats = step_stats(batches, loss_reduction)
        assert stats['loss'] == pytest.approx(loss, rel=1e-5) and stats['grad_norm'] == pytest.approx(grad_norm, rel=1e-4)
    # 2 ranks x 2 micro-batches each: normalised over the whole step, both ranks' tokens together
    torch.multiprocessing.spawn(reduction_rank, args=(str(tmp_path / 'store'), str(tmp_path / 'out.json')), nprocs=2)
    for loss_reduction, (loss, grad_norm) in json.loads((tmp_path / 'out.json').read_text()).items():
        assert loss == pytest.approx(expected[loss_reduction][0], rel=1e-5), loss_reduction
        assert grad_norm == pytest.approx(expected[loss_reduction][1], rel=1e-4), loss_reduction


def test_loader_epochs_ranks_and_resume():
    ids = np.arange(1, 41, dtype=np.int32)  # 10 conversations of 4 tokens: 1-4, 5-8, ...
    mask = np.ones(40, dtype=bool)
    offsets = list(range(0, 41, 4))
    first = lambda x: sorted(((x[:, 0] - 1) // 4).tolist())
    loader = ChatLoader(ids, mask, offsets, batch_size=2, seed=5)
    epoch = [first(loader.next_batch()[0]) for _ in range(5)]
    assert sorted(c for batch in epoch for c in batch) == list(range(10))  # each conversation once
    assert [first(loader.next_batch()[0]) for _ in range(5)] != epoch  # a new order next epoch
    # two ranks of batch 2 share out the batches of one rank of batch 4
    single = ChatLoader(ids, mask, offsets, batch_size=4, seed=5)
    ranks = [ChatLoader(ids, mask, offsets, batch_size=2, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(4):
        assert first(single.next_batch()[0]) == sorted(first(ranks[0].next_batch()[0]) + first(ranks[1].next_batch()[0]))
    # state_dict resumes exactly
    state = ranks[1].state_dict()
    expected = [ranks[1].next_batch()[0] for _ in range(3)]
    resumed = ChatLoader(ids, mask, offsets, batch_size=2, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(a, resumed.next_batch()[0]) for a in expected)
    with pytest.raises(ValueError, match='conversations: the checkpoint has 10, this run 9'):
        ChatLoader(ids[:36], mask[:36], offsets[:10], batch_size=2, rank=1, world_size=2, seed=5).load_state_dict(state)


def test_linear_schedule():
    lr = lambda step: trainer.lr_at(step, 5e-6, 3, 103, min_lr_ratio=0.0, decay='linear')
    assert [lr(s) for s in range(3)] == pytest.approx([5e-6 / 3, 5e-6 * 2 / 3, 5e-6])
    assert lr(53) == pytest.approx(2.5e-6) and lr(103) == 0.0
    assert lr(3) == 5e-6 and all(lr(s) > lr(s + 1) for s in range(3, 103))


def test_pydoc_demo_data(mistral):
    conversations = list(chat_data.pydoc_conversations())
    assert len(conversations) > 800
    sqrt = next(c for c in conversations if len(c) == 4 and c[3]['content'] == 'math.sqrt(x, /)')
    assert 'math.sqrt' in sqrt[0]['content'] and sqrt[1]['content'] == 'Return the square root of x.'
    assert any(c[0]['content'] == 'Explain the "assert" statement.' for c in conversations)
    assert not any(' at 0x' in m['content'] for c in conversations for m in c)  # the same data in every run
    ids, mask, offsets, skipped = chat_data.load_conversations('pydoc', mistral, 256, workers=1)
    assert len(offsets) - 1 == len(conversations) and sum(skipped.values()) == 0


def test_worker_processes_encode_the_same(mistral, tmp_path):
    path = write_jsonl(tmp_path / 'many.jsonl', (CHATS + SKIPPED) * 40)
    one = chat_data.load_conversations(str(path), mistral, 64, workers=1)
    two = chat_data.load_conversations(str(path), mistral, 64, workers=2)
    for a, b in zip(one[:3], two[:3]):
        assert (a == b).all()
    assert one[3] == two[3] == {'no assistant turn': 40, 'no reply within block_size': 40}
    with open(path, 'a') as f:
        f.write(json.dumps({'messages': [{'role': 'bot', 'content': 'hi'}]}) + '\n')
    with pytest.raises(trainer.UsageError, match="many.jsonl:321: message 0: expected"):
        chat_data.load_conversations(str(path), mistral, 64, workers=2)


# ----------------------------------------------------------------------------- real runs

def test_fine_tuning_learns_the_replies_and_sample_chats_them_back(reference):
    out, stdout, loss = reference
    assert '6 conversations' in stdout and '1 skipped: no assistant turn, 1 skipped: no reply within block_size' in stdout
    assert sorted(loss) == list(range(1, STEPS + 1)) and loss[STEPS] < 0.05 * loss[1]
    for chat in (CHATS[1], CHATS[4]):  # CHATS[1] starts with a system message
        system = [f"--system={chat[0]['content']}"] if chat[0]['role'] == 'system' else []
        user, reply = [m['content'] for m in chat if m['role'] != 'system'][:2]
        result = subprocess.run([sys.executable, 'sample.py', f'--ckpt={out / "final.pt"}', '--chat', *system,
                                 '--prompt', user, '--temperature=0', '--max_new_tokens=30'],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout == reply + '\n'


def test_kill_then_resume_is_identical(reference, tiny, chats, tmp_path):
    """SIGKILL leaves no chance to save: the run resumes from its last checkpoint (step 30) and
    replays the steps after it; every loss equals the uninterrupted run's bit for bit."""
    _, _, loss = reference
    args = [f'--init_from={tiny}', f'--dataset={chats}', *ARGS]
    p = run(args, tmp_path, wait=False)
    wait_for(lambda: (tmp_path / 'log.jsonl').exists() and max(losses(tmp_path), default=0) >= 40, p)
    p.kill()
    p.communicate()
    assert not (tmp_path / 'final.pt').exists(), "the run ended before the kill; nothing was tested"
    assert (tmp_path / 'checkpoints' / 'step_00000030' / 'meta.json').exists()
    rc, stdout, stderr = run(args, tmp_path)
    assert rc == 0, stderr
    assert 'resumed from' in stdout and 'step_00000030' in stdout
    assert losses(tmp_path) == loss


def test_torchrun_two_ranks_matches_one_process(reference, tiny, chats, tmp_path):
    """Batch 1 on each of 2 ranks = batch 1 x 2 accumulation in one process: the same pairs of
    conversations, each step's loss the mean of two conversations' means. Then SIGTERM to
    torchrun: both ranks stop at the same step and save."""
    out = reference[0]
    args = [a if a != '--grad_accum=2' else '--global_batch_size=2' for a in ARGS]  # accumulation 1 on 2 ranks
    p = run([f'--init_from={tiny}', f'--dataset={chats}', *args], tmp_path, nproc=2, wait=False)
    wait_for(lambda: (tmp_path / 'log.jsonl').exists() and max(losses(tmp_path), default=0) >= 12, p)
    p.send_signal(signal.SIGTERM)  # torchrun passes it on; both ranks stop at the same step and save
    stdout, stderr = p.communicate(timeout=120)
    assert 'FSDP2' in stdout and '1 x 1 accum x 2 ranks = 2 conversations' in stdout and 'checkpoint saved' in stdout, stderr[-3000:]
    stopped_at = max(losses(tmp_path))
    assert (tmp_path / 'checkpoints' / f'step_{stopped_at:08d}' / 'meta.json').exists()
    # every logged number of every step up to the stop: loss, grad_norm, lr, tokens
    two_ranks = logged_numbers(tmp_path)
    assert {name for _, name in two_ranks} == {'loss', 'grad_norm', 'lr', 'tokens'}
    assert {step for step, _ in two_ranks} == set(range(1, stopped_at + 1))
    assert_same_numbers(two_ranks, logged_numbers(out))


def test_bad_input_stops_with_one_line_and_loses_nothing(reference, tiny, tmp_path):
    out, _, _ = reference
    finished = tmp_path / 'finished'
    shutil.copytree(out, finished)  # a finished run's out_dir: none of the failed runs may touch it
    before = tree_digest(finished)
    unknown_role = {'messages': [CHATS[0][0], {'role': 'gpt', 'content': 'x'}]}
    cases = [  # (the error, the .jsonl rows or its text, more arguments)
        ("{data}:2: no 'messages' field", [{'messages': CHATS[0]}, {'conversation': CHATS[0]}], []),
        ("{data}:3: message 1: expected {{'role': one of system, user, assistant", [{'messages': CHATS[0]}] * 2 + [unknown_role], []),
        ("{data}:2: 'messages' is str, not a list", [{'messages': CHATS[0]}, {'messages': 'hello'}], []),
        ("{data}:1: not valid JSON", '{"messages": [}\n', []),
        ("no conversation to train on (0 skipped: no assistant turn, 1 skipped: no reply within block_size)",
         [{'messages': SKIPPED[1]}], []),
        ("unknown config key '--epoch' (did you mean --epochs", [{'messages': CHATS[0]}], ['--epoch=2']),
        ("global_batch_size=3 conversations is not a multiple of batch_size=2 x 1 ranks = 2", [{'messages': CHATS[0]}],
         ['--batch_size=2', '--global_batch_size=3']),
    ]
    procs = {}
    for n, (expected, rows, extra) in enumerate(cases):
        data = tmp_path / f'bad{n}.jsonl'
        data.write_text(rows if isinstance(rows, str) else ''.join(json.dumps(r) + '\n' for r in rows))
        procs[expected.format(data=data)] = subprocess.Popen(
            [sys.executable, 'sft.py', f'--init_from={tiny}', f'--dataset={data}', *ARGS, f'--out_dir={finished}', *extra],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the demo's own message when pretrain.py has not been run
    procs["init_from=out/none.pt: no such file or directory (the demo fine-tunes the demo model: run `python pretrain.py` first)"] = \
        subprocess.Popen([sys.executable, 'sft.py', '--init_from=out/none.pt', f'--out_dir={tmp_path / "new"}'],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert_one_line_errors(procs)
    assert tree_digest(finished) == before
    assert not (tmp_path / 'new').exists()
