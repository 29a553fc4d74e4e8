"""dpo.py on CPU: the pairs and the loss checked against a hand computation (each conversation
forwarded alone), then real runs as subprocesses (training, the cached reference, kill and
resume, torchrun, bad input) with a tiny model that uses Mistral's real 32k tokenizer."""
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import chats as chat_data  # noqa: E402
import dpo  # noqa: E402  (importing it runs nothing: the run is under __main__)
import trainer  # noqa: E402
from dataloader import PairLoader  # noqa: E402
from model import Transformer, model_args  # noqa: E402
from tokenizer import Tokenizer, encode_chat  # noqa: E402
from training_runs import ROOT, assert_one_line_errors, start, tree_digest, wait_for, write_jsonl  # noqa: E402
from weights import load_model, save_checkpoint  # noqa: E402

LN2 = math.log(2)
user, assistant, system = (lambda content, role=role: dict(role=role, content=content)
                           for role in ('user', 'assistant', 'system'))


def pair(prompt, chosen, rejected):
    return {'chosen': prompt + [assistant(chosen)], 'rejected': prompt + [assistant(rejected)]}


PAIRS = [
    pair([user('What is the capital of France?')], 'Paris.', 'Berlin is the capital of France.'),
    pair([system('Answer in one word.'), user('Which colour is the sky?')], 'Blue.', 'Green.'),
    # a multi-turn prompt: its earlier assistant turn is context, not scored
    pair([user('Say hello in Italian.'), assistant('Ciao!'), user('And goodbye?')], 'Arrivederci!', 'Ciao!'),
    pair([user('How many legs does a spider have?')], 'Eight.', 'Six legs, like every insect.'),
    # the responses differ in length only: dpo_norm and dpo weigh it differently
    pair([user('Is water wet?')], 'Yes.', 'Yes. Yes. Yes. Yes. Yes. Yes.'),
    pair([user('Name a prime number.')], 'Seven is prime.', 'Nine is prime.'),
    pair([user('What do bees make?')], 'Bees make honey.', 'Bees make milk.'),
    pair([user('What is two plus two?')], 'Four.', 'Five.'),
    pair([user('Which is heavier, a kilo of lead or a kilo of feathers?')], 'They weigh the same.', 'Lead.'),
    pair([user('What is the opposite of hot?')], 'Cold.', 'Warm.'),
]
TOO_LONG = pair([user('word ' * 100)], 'Too long.', 'Far too long.')
# 10 pairs, 2 held out; batch 2 x accumulation 2 = 2 steps an epoch (the torchrun test: batch 2 on each of 2 ranks)
ARGS = ['--block_size=64', '--heldout_pairs=2', '--batch_size=2', '--grad_accum=2', '--epochs=8.0', '--lr=2e-3',
        '--beta=0.5', '--warmup_ratio=0.1', '--log_interval=1', '--ckpt_interval=6', '--keep_last=2', '--seed=3']
STEPS = 16


# the hand computations run many tiny forwards: one thread (tests/conftest.py), not two spinning
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def mistral():
    return Tokenizer.load('mistral')


def tiny_model(seed):
    torch.manual_seed(seed)
    model = Transformer(model_args('tiny', vocab_size=32000, sliding_window=16))
    model.init_weights()
    return model


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A random tiny model with the full Mistral vocabulary, saved as this project's checkpoint."""
    path = tmp_path_factory.mktemp('init') / 'tiny.pt'
    save_checkpoint(str(path), tiny_model(0), 'mistral')
    return path


@pytest.fixture(scope='module')
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp('data') / 'pairs.jsonl', PAIRS[:3] + [TOO_LONG] + PAIRS[3:])


def run(args, out_dir, nproc=0, wait=True):
    return start('dpo.py', [*args, f'--out_dir={out_dir}'], nproc, wait=wait)


def records(out_dir):
    """{step: {name: value}} of the training steps logged, and the held-out reports, from log.jsonl
    (a step logged twice, replayed after a kill, keeps its last record)."""
    steps, heldout = {}, {}
    for line in open(Path(out_dir) / 'log.jsonl'):
        r = json.loads(line)
        (heldout if 'heldout/loss' in r else steps)[r['step']] = r
    return steps, heldout


@pytest.fixture(scope='module')
def reference(tiny, pairs_file, tmp_path_factory):
    """One uninterrupted run that the other runs are compared against."""
    out = tmp_path_factory.mktemp('reference')
    rc, stdout, stderr = run([f'--init_from={tiny}', f'--dataset={pairs_file}', *ARGS], out)
    assert rc == 0, stderr
    return out, stdout, *records(out)


# ----------------------------------------------------------------------------- by hand

def response_logp(model, tokenizer, messages):
    """Summed log-probability of the final response and its EOS, and its token count, forwarding
    the conversation alone (no padding, no batch): the hand computation the tests compare with."""
    prompt = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)[0]
    ids = encode_chat(tokenizer, messages)[0]
    end = len(ids) - ids[::-1].index(tokenizer.eos_id)  # up to the final EOS, not the newline after it
    assert ids[:len(prompt)] == prompt
    with torch.no_grad():
        logits = model(torch.tensor([ids[:end - 1]]))[0][0].double()
    log_probs = logits.log_softmax(-1)
    return sum(log_probs[t - 1, ids[t]].item() for t in range(len(prompt), end)), end - len(prompt)


def hand_loss(policy, reference, tokenizer, row, beta, loss_type):
    """-log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), per token for dpo_norm."""
    terms = []
    for side in ('chosen', 'rejected'):
        (p, n), (r, _) = (response_logp(m, tokenizer, row[side]) for m in (policy, reference))
        terms.append((p - r) / n if loss_type == 'dpo_norm' else p - r)
    margin = beta * (terms[0] - terms[1])
    return math.log1p(math.exp(-margin)), beta * terms[0], beta * terms[1]


def test_pairs_score_only_the_final_response(mistral, pairs_file):
    ids, mask, offsets, skipped = chat_data.load_pairs(str(pairs_file), mistral, 64, workers=1, seed=0)
    assert skipped == {'longer than block_size': 1} and len(offsets) - 1 == 2 * len(PAIRS)
    for i, row in enumerate(PAIRS):
        for j, side in enumerate(('chosen', 'rejected')):
            s = slice(offsets[2 * i + j], offsets[2 * i + j + 1])
            scored = ids[s][mask[s]].tolist()
            assert scored[-1] == mistral.eos_id and mistral.decode(scored[:-1]) == row[side][-1]['content']
            # everything before the response is the prompt, exactly as sample.py --chat would render it
            prompt = encode_chat(mistral, row[side][:-1], add_generation_prompt=True)[0]
            assert ids[s][:len(prompt)].tolist() == prompt and not mask[s][:len(prompt)].any()
    # the pydoc demo: each pair's rejected answer is another object's, never the same text
    demo = list(chat_data.pydoc_preferences(seed=1))
    assert len(demo) == len(list(chat_data.pydoc_conversations()))
    assert all(r['chosen'][0] == r['rejected'][0] and r['chosen'][1] != r['rejected'][1] for _, r in demo)
    sqrt = next(r for _, r in demo if r['chosen'][0]['content'] == 'What is math.sqrt for?')
    assert sqrt['chosen'][1]['content'] == 'Return the square root of x.'
    assert [r for _, r in demo] == [r for _, r in chat_data.pydoc_preferences(seed=1)]  # the same every run


@pytest.mark.concept
@pytest.mark.parametrize('loss_type', ['dpo_norm', 'dpo'])
def test_loss_equals_the_hand_computation(mistral, pairs_file, loss_type):
    policy, ref_model = tiny_model(1), tiny_model(2)
    ids, mask, offsets, _ = chat_data.load_pairs(str(pairs_file), mistral, 64, workers=1, seed=0)
    beta = 0.1
    hand = [hand_loss(policy, ref_model, mistral, row, beta, loss_type) for row in PAIRS]
    reference = torch.tensor([[response_logp(ref_model, mistral, row[side])[0] for side in ('chosen', 'rejected')]
                              for row in PAIRS], dtype=torch.float32)
    with torch.no_grad():
        one_by_one = PairLoader(ids, mask, offsets, range(len(PAIRS)), batch_size=1)
        for g in range(len(PAIRS)):
            batch = one_by_one.group(g)
            loss_sum, units, metrics = dpo.dpo_loss(policy, batch, reference, beta, loss_type)
            i = batch[2].item()
            assert units == 1 and loss_sum.item() == pytest.approx(hand[i][0], abs=1e-6)
            assert metrics['rewards/chosen'].item() == pytest.approx(hand[i][1], abs=1e-6)
            assert metrics['rewards/rejected'].item() == pytest.approx(hand[i][2], abs=1e-6)
            assert metrics['rewards/accuracies'].item() == (hand[i][1] > hand[i][2])
        # all ten in one padded micro-batch: the sums of the same
        batch = PairLoader(ids, mask, offsets, range(len(PAIRS)), batch_size=len(PAIRS)).group(0)
        loss_sum, units, metrics = dpo.dpo_loss(policy, batch, reference, beta, loss_type)
    assert units == len(PAIRS) and loss_sum.item() == pytest.approx(sum(h[0] for h in hand), abs=1e-5)
    assert metrics['rewards/margins'].item() == pytest.approx(sum(h[1] - h[2] for h in hand), abs=1e-5)


def test_length_only_pair_differs_between_dpo_and_dpo_norm(mistral, tmp_path):
    """Yes. vs Yes. Yes. ...: summed log-probs punish the long response for its length, per-token ones
    far less, so the two losses differ, each as the formula says."""
    policy, ref_model = tiny_model(1), tiny_model(2)
    row = PAIRS[4]
    ids, mask, offsets, _ = chat_data.load_pairs(str(write_jsonl(tmp_path / 'one.jsonl', [row])), mistral, 64, 1, 0)
    batch = PairLoader(ids, mask, offsets, [0], batch_size=1).group(0)
    reference = torch.tensor([[response_logp(ref_model, mistral, row[side])[0] for side in ('chosen', 'rejected')]])
    losses = {}
    with torch.no_grad():
        for loss_type in ('dpo_norm', 'dpo'):
            losses[loss_type] = dpo.dpo_loss(policy, batch, reference, 0.1, loss_type)[0].item()
            assert losses[loss_type] == pytest.approx(hand_loss(policy, ref_model, mistral, row, 0.1, loss_type)[0], abs=1e-6)
    assert abs(losses['dpo_norm'] - losses['dpo']) > 1e-3


def test_heldout_pairs_are_never_trained_on():
    heldout, train = dpo.split_pairs(50, 7, seed=3)
    assert len(heldout) == 7 and sorted(np.concatenate([heldout, train]).tolist()) == list(range(50))
    seen = set()
    loader = PairLoader(np.zeros(100, dtype=np.int32), np.ones(100, dtype=bool), np.arange(101), train, batch_size=3,
                        rank=1, world_size=2, seed=3)
    for _ in range(3 * loader.steps_per_epoch):
        seen.update(loader.next_batch()[2].tolist())
    assert seen and not seen & set(heldout.tolist())


# ----------------------------------------------------------------------------- real runs

def test_training_prefers_the_chosen_responses(reference):
    out, stdout, steps, heldout = reference
    assert '10 pairs (8 to train on, 2 held out)' in stdout and '1 skipped: longer than block_size' in stdout
    assert sorted(steps) == list(range(1, STEPS + 1))
    # step 1: the policy is the reference, bit for bit
    first = steps[1]
    assert first['loss'] == pytest.approx(LN2, abs=1e-7)
    assert all(first[f'rewards/{k}'] == 0 for k in ('chosen', 'rejected', 'margins', 'accuracies'))
    last = steps[STEPS]
    assert last['loss'] < 0.5 * LN2 and last['rewards/accuracies'] == 1 and last['rewards/margins'] > 0
    assert set(heldout) == {0, STEPS} and heldout[0]['heldout/rewards/accuracies'] == 0
    assert heldout[0]['heldout/loss'] == pytest.approx(LN2, abs=1e-7)
    assert 'held-out pairs before training' in stdout and 'held-out pairs after training' in stdout


def test_heldout_report_and_cached_reference_match_a_fresh_forward(reference, tiny, mistral):
    """The cache holds the initial model's log-probs of every response; the final report is the
    trained model's rewards on exactly the held-out pairs, computed here by hand from final.pt."""
    out, _, _, heldout = reference
    cache = torch.load(out / 'reference_logps.pt', weights_only=True)
    initial, trained = load_model(str(tiny))[0], load_model(str(out / 'final.pt'))[0]
    fresh = [[response_logp(initial, mistral, row[side])[0] for side in ('chosen', 'rejected')] for row in PAIRS]
    assert cache['logps'].flatten().tolist() == pytest.approx(np.ravel(fresh), rel=1e-5)
    held, _ = dpo.split_pairs(len(PAIRS), 2, seed=3)
    report = [hand_loss(trained, initial, mistral, PAIRS[i], 0.5, 'dpo_norm') for i in held]
    after = heldout[STEPS]
    assert after['heldout/loss'] == pytest.approx(np.mean([r[0] for r in report]), abs=1e-5)
    assert after['heldout/rewards/margins'] == pytest.approx(np.mean([r[1] - r[2] for r in report]), abs=1e-5)
    assert after['heldout/rewards/accuracies'] == np.mean([r[1] > r[2] for r in report])


def test_kill_then_resume_is_identical(reference, tiny, pairs_file, tmp_path):
    """SIGKILL leaves no chance to save: the run resumes from its last checkpoint (step 6), reads
    the cached reference back, and replays the steps after it; every logged number equals the
    uninterrupted run's bit for bit."""
    _, _, steps, heldout = reference
    args = [f'--init_from={tiny}', f'--dataset={pairs_file}', *ARGS]
    p = run(args, tmp_path, wait=False)
    wait_for(lambda: (tmp_path / 'log.jsonl').exists() and max(records(tmp_path)[0], default=0) >= 8, p)
    p.kill()
    p.communicate()
    assert not (tmp_path / 'final.pt').exists(), "the run ended before the kill; nothing was tested"
    rc, stdout, stderr = run(args, tmp_path)
    assert rc == 0, stderr
    assert 'resumed from' in stdout and 'step_00000006' in stdout and 'reference log-probs of' not in stdout
    resumed_steps, resumed_heldout = records(tmp_path)
    drop_time = lambda r: {k: v for k, v in r.items() if k not in ('time', 'tokens_per_s', 'mfu')}
    assert {s: drop_time(r) for s, r in resumed_steps.items()} == {s: drop_time(r) for s, r in steps.items()}
    assert resumed_heldout == heldout


def test_torchrun_two_ranks_matches_one_process(reference, tiny, pairs_file, tmp_path):
    """Batch 2 on each of 2 ranks = batch 2 x 2 accumulation in one process: the same micro-batches,
    the same steps; every logged number agrees."""
    _, _, steps, heldout = reference
    args = [a if a != '--grad_accum=2' else '--grad_accum=1' for a in ARGS]
    rc, stdout, stderr = run([f'--init_from={tiny}', f'--dataset={pairs_file}', *args], tmp_path, nproc=2)
    assert rc == 0 and 'FSDP2' in stdout, stderr[-3000:]
    fsdp_steps, fsdp_heldout = records(tmp_path)
    assert sorted(fsdp_steps) == sorted(steps)
    for step, record in steps.items():
        for key in ('loss', 'grad_norm', 'lr', 'tokens', 'rewards/chosen', 'rewards/rejected', 'rewards/margins',
                    'rewards/accuracies'):
            assert fsdp_steps[step][key] == pytest.approx(record[key], rel=1e-4, abs=1e-6), (step, key)
    for when, record in heldout.items():
        assert fsdp_heldout[when] == pytest.approx(record, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize('expected, rows', [
    ("bad.jsonl:2: a preference pair needs 'chosen' and 'rejected' fields, this row has ['chosen', 'prompt']",
     [PAIRS[0], {'prompt': 'x', 'chosen': PAIRS[0]['chosen']}]),
    ("bad.jsonl:2: 'chosen' and 'rejected' differ at message 0: the two conversations of a pair share",
     [PAIRS[0], {'chosen': PAIRS[0]['chosen'], 'rejected': [user('What is the capital of Spain?'), assistant('Madrid.')]}]),
    ("bad.jsonl:3: 'chosen' and 'rejected' differ at message 1", [PAIRS[0], PAIRS[1], pair([user('Hi')], 'a', 'b') | {
        'rejected': [user('Hi'), assistant('Hello.'), user('Hi again'), assistant('b')]}]),
    ("bad.jsonl:3: the 'rejected' response is empty", [PAIRS[0], PAIRS[1], pair([user('Hi')], 'Hello.', '  ')]),
    ("bad.jsonl:1: 'chosen' message 0: expected {'role': one of system, user, assistant",
     [{'chosen': [{'role': 'human', 'content': 'Hi'}, assistant('Hello.')], 'rejected': PAIRS[0]['rejected']}]),
    ("bad.jsonl:1: 'rejected' ends with a user message, not the assistant's response",
     [{'chosen': PAIRS[0]['chosen'], 'rejected': PAIRS[0]['chosen'][:1]}]),
    ("bad.jsonl:1: 'chosen' is not a list of messages", [{'chosen': 'Paris.', 'rejected': PAIRS[0]['rejected']}]),
    ("no preference pair to train on (1 skipped: longer than block_size)", [TOO_LONG]),
])
def test_bad_rows_are_named(mistral, tmp_path, expected, rows):
    data = write_jsonl(tmp_path / 'bad.jsonl', rows)
    with pytest.raises(trainer.UsageError) as e:
        chat_data.load_pairs(str(data), mistral, 64, workers=1, seed=0)
    assert expected in str(e.value) and str(data) in str(e.value)


def test_bad_input_stops_with_one_line_and_loses_nothing(reference, tiny, tmp_path):
    """A finished run's out_dir: neither a bad row nor a run whose reference log-probs would differ
    (other data: refused, not recomputed over the cache) may touch it."""
    out, _, _, _ = reference
    finished = tmp_path / 'finished'
    shutil.copytree(out, finished)
    before = tree_digest(finished)
    procs = {}
    for expected, rows in [("{data}:2: a preference pair needs 'chosen' and 'rejected' fields", [PAIRS[0], {'chosen': []}]),
                           ("reference_logps.pt holds the reference log-probs of other data, batching or init_from", PAIRS[1:])]:
        data = write_jsonl(tmp_path / f'data{len(procs)}.jsonl', rows)
        procs[expected.format(data=data)] = start('dpo.py', [f'--init_from={tiny}', f'--dataset={data}', *ARGS,
                                                             f'--out_dir={finished}'], wait=False)
    procs["init_from=out/none.pt: no such file or directory (the demo tunes the SFT demo model: run `python sft.py` first)"] = \
        start('dpo.py', ['--init_from=out/none.pt', f'--out_dir={tmp_path / "new"}'], wait=False)
    assert_one_line_errors(procs)
    assert tree_digest(finished) == before
    assert not (tmp_path / 'new').exists()


def test_tulu3_config_sets_only_dpo_settings():
    """config/dpo_tulu3.py needs the hub and 8 GPUs to run; here it is applied to dpo.py's settings."""
    import configurator
    settings = {k: getattr(dpo, k) for k in dpo.config_keys}
    configurator.apply_overrides(settings, dpo.config_keys, [str(ROOT / 'config' / 'dpo_tulu3.py')])
    assert (settings['loss_type'], settings['beta'], settings['lr'], settings['epochs']) == ('dpo_norm', 5.0, 5e-7, 1.0)
    assert settings['global_batch_size'] == 128 and settings['block_size'] == 2048
    assert dpo.grad_accum_for(128, settings['batch_size'], 8, 'pairs') == 16  # open-instruct's 1 x 16 x 8 GPUs
    assert settings['init_from'] == 'out/moxin7b_instruct/final.pt'  # what config/sft_tulu3.py writes
