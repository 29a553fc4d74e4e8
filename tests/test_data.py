"""data.py: cleaning, dedup, mixture, shards, the packed loader and the chat format,
each checked against a truth computed another way (by hand, with Python sets, or datasketch)."""
import importlib.resources
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data
from data import Dedup, MinHash, Preparer, build, long_enough

DEFAULTS = {k: getattr(data, k) for k in data.config_keys}  # the settings python data.py runs with
from dataloader import PackedLoader
from tokenizer import Tokenizer, encode_chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def words_doc(rng, n_words, vocab):
    return ' '.join(rng.choice(vocab, n_words))


@pytest.fixture(scope='module')
def vocab():
    rng = np.random.default_rng(0)
    return np.array([''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), rng.integers(3, 9))) for _ in range(3000)])


@pytest.fixture(scope='module')
def mistral():
    return Tokenizer.load('mistral')


def config(tmp_path, sources, **overrides):
    return {**DEFAULTS, 'out_dir': str(tmp_path / 'out'), 'sources': sources, 'workers': 2,
            'val_tokens': 0, **overrides}


def write_jsonl(path, texts, field='text'):
    path.write_text(''.join(json.dumps({field: t, 'id': i}) + '\n' for i, t in enumerate(texts)))
    return str(path)


def read_documents(out_dir, split, tok):
    """Decode every BOS..EOS document from a split's shards, in order."""
    meta = json.load(open(os.path.join(out_dir, 'meta.json')))
    ids = np.concatenate([np.fromfile(os.path.join(out_dir, f'{split}_{i:04d}.bin'), dtype=meta['dtype'])
                          for i in range(len(meta['shards'][split]))]).tolist()
    ends = [i for i, t in enumerate(ids) if t == tok.eos_id]
    starts = [0] + [e + 1 for e in ends[:-1]]
    assert all(ids[s] == tok.bos_id for s in starts) and ends[-1] == len(ids) - 1
    return [tok.decode(ids[s + 1:e]) for s, e in zip(starts, ends)]


# ------------------------------------------------------------------- cleaning

def test_length_rule_edges():
    assert long_enough('a' * 200) and not long_enough('a' * 199)
    # punctuation, spaces, newlines and tabs are not counted...
    assert not long_enough('a' * 199 + ' \n\t.,;!?"()[]{}' * 20)
    assert long_enough(' '.join('a' * 200) + '!!!')
    # ...but other whitespace and non-ASCII letters are, one per character
    assert long_enough('a' * 199 + '\r') and long_enough('é' * 200) and not long_enough('日' * 199)
    assert not long_enough('') and long_enough('', min_chars=0)


def test_exact_dedup_on_normalised_text(vocab):
    rng = np.random.default_rng(1)
    prep, dedup = Preparer('mistral', 200, 128, 9), Dedup(9)
    doc = words_doc(rng, 100, vocab)
    variants = [doc, doc.upper(), '  ' + doc.replace(' ', '\n\t ') + '\n', words_doc(rng, 100, vocab)]
    verdicts = [dedup.check(*prep(text)[1][:2]) for text in variants]
    assert verdicts == [None, 'exact_dup', 'exact_dup', None]


# ------------------------------------------------------------------- minhash

def exact_jaccard(a, b, n=13):
    grams = lambda words: {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    ga, gb = grams(a.lower().split()), grams(b.lower().split())
    return len(ga & gb) / len(ga | gb)


@pytest.mark.concept
def test_minhash_estimates_exact_jaccard(vocab):
    rng = np.random.default_rng(2)
    minhash = MinHash(num_perm=2048, bands=16)  # enough permutations that 0.05 is > 4 standard deviations
    errors = []
    for changed in [0, 1, 2, 4, 8, 16, 30, 60, 120, 200, 400]:
        words = list(rng.choice(vocab, 400))
        other = list(words)
        for i in rng.choice(400, changed, replace=False):
            other[i] = 'zz' + other[i]
        a, b = ' '.join(words), ' '.join(other)
        estimate = np.mean(minhash.signature(a) == minhash.signature(b))
        errors.append(abs(estimate - exact_jaccard(a, b)))
    assert max(errors) < 0.05, errors


def test_lsh_bands_match_datasketch():
    from datasketch.lsh import _optimal_param
    for threshold, num_perm in [(0.8, 128), (0.5, 64), (0.9, 256)]:
        assert data.lsh_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)[0]


def test_planted_near_duplicates_removed_and_agree_with_datasketch(vocab):
    from datasketch import MinHash as DSMinHash, MinHashLSH
    rng = np.random.default_rng(3)
    docs, planted = [], []
    for _ in range(60):
        docs.append(words_doc(rng, 1000, vocab))
        if rng.random() < 0.4:  # a copy with a few words changed, somewhere later
            words = docs[-1].split()
            for i in rng.choice(1000, 2, replace=False):
                words[i] = 'changed'
            planted.append(' '.join(words))
    order = docs + planted
    bands = data.lsh_bands(0.8, 128)
    prep, dedup = Preparer('mistral', 200, 128, bands), Dedup(bands)
    ours = [dedup.check(*prep(text)[1][:2]) for text in order]
    assert ours == [None] * len(docs) + ['near_dup'] * len(planted)
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    theirs = []
    for n, text in enumerate(order):
        m = DSMinHash(num_perm=128)
        words = text.lower().split()
        m.update_batch([' '.join(words[i:i + 13]).encode() for i in range(len(words) - 12)])
        theirs.append('near_dup' if lsh.query(m) else lsh.insert(str(n), m))
    assert theirs == ours


# ------------------------------------------------------------------- shards

def test_shards_decode_to_source_text_with_weighted_mixture(tmp_path, vocab, mistral):
    rng = np.random.default_rng(4)
    a = [words_doc(rng, rng.integers(60, 200), vocab) for _ in range(40)]
    b = ['Line one: ' + words_doc(rng, rng.integers(60, 200), vocab) + '\n\tcode()  # ünïcode\n' for _ in range(40)]
    b[5] = b[3].upper()  # an exact duplicate (after normalisation) that must not reach the shards
    sources = [dict(name='a', kind='local', path=write_jsonl(tmp_path / 'a.jsonl', a), weight=3),
               dict(name='b', kind='local', path=write_jsonl(tmp_path / 'b.jsonl', b), weight=1)]
    cfg = config(tmp_path, sources, shard_tokens=3000, val_tokens=1000)
    meta = build(cfg)
    out = cfg['out_dir']
    assert sorted(os.listdir(out)) == ['meta.json'] + [f'train_{i:04d}.bin' for i in range(len(meta['shards']['train']))] + ['val_0000.bin']
    assert len(meta['shards']['train']) > 2
    docs = read_documents(out, 'val', mistral) + read_documents(out, 'train', mistral)
    # every kept document comes back exactly, each source in its own order
    assert [d for d in docs if d in a] == a and [d for d in docs if d in b] == b[:5] + b[6:]
    assert len(docs) == 79 and meta['cleaning']['b']['exact_dup'] == [1, len(b[5].encode())]
    # meta.json agrees with the files
    for split, counts in meta['shards'].items():
        for i, n in enumerate(counts):
            assert os.path.getsize(os.path.join(out, f'{split}_{i:04d}.bin')) == 2 * n
        assert sum(meta['tokens'][s][split] for s in 'ab') == sum(counts) == meta['split_tokens'][split]
    assert meta['split_tokens']['val'] >= 1000 and meta['dtype'] == 'uint16' and meta['tokenizer'] == 'mistral'
    # while both sources last, tokens follow the 3:1 weights (the mixture takes whole documents)
    sizes = {s: [len(mistral.encode(t)) + 2 for t in texts] for s, texts in (('a', a), ('b', b[:5] + b[6:]))}
    taken, tokens = {'a': 0, 'b': 0}, {'a': 0, 'b': 0}
    for d in docs[:40]:
        s = 'a' if d in a else 'b'
        tokens[s] += sizes[s][taken[s]]
        taken[s] += 1
    assert 2.5 < tokens['a'] / tokens['b'] < 3.5
    assert build(cfg) == meta  # re-running a finished build skips it


def test_error_midway_keeps_finished_shards_and_resume_equals_clean_run(tmp_path, vocab, mistral):
    rng = np.random.default_rng(5)
    texts = [words_doc(rng, 150, vocab) for _ in range(30)]
    broken = tmp_path / 'broken.jsonl'
    broken.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts[:25]) + '{"txt": "oops"}\n'
                      + ''.join(json.dumps({'text': t}) + '\n' for t in texts[26:]))
    cfg = config(tmp_path, [dict(name='web', kind='local', path=str(broken), weight=1)], shard_tokens=1500)
    with pytest.raises(ValueError, match=r'broken.jsonl:26: no \'text\' field$'):
        build(cfg)
    out = cfg['out_dir']
    finished = sorted(f for f in os.listdir(out) if f.endswith('.bin'))
    inodes = {f: os.stat(os.path.join(out, f)).st_ino for f in finished}  # a rewrite (tmp + rename) changes it
    assert len(finished) >= 2 and 'state.npz' in os.listdir(out) and 'meta.json' not in os.listdir(out)
    # fix the row and re-run: finished shards are kept, the rest equals a clean build
    write_jsonl(broken, texts)
    build(cfg)
    assert inodes == {f: os.stat(os.path.join(out, f)).st_ino for f in finished}
    clean = config(tmp_path, cfg['sources'], shard_tokens=1500, out_dir=str(tmp_path / 'clean'))
    build(clean)
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean['out_dir']))
    for f in os.listdir(out):
        if f.endswith('.bin'):
            assert open(os.path.join(out, f), 'rb').read() == open(os.path.join(clean['out_dir'], f), 'rb').read()
    assert read_documents(out, 'train', mistral) == texts
    with pytest.raises(ValueError, match='built with other settings'):
        build({**cfg, 'min_chars': 10})


def test_hf_streaming_and_parquet_sources(tmp_path, vocab, mistral):
    import pyarrow
    import pyarrow.parquet
    rng = np.random.default_rng(6)
    texts = [words_doc(rng, 80, vocab) for _ in range(9)]
    write_jsonl(tmp_path / 'rows.jsonl', texts[:6], field='content')
    pyarrow.parquet.write_table(pyarrow.table({'body': texts[6:]}), tmp_path / 'p.parquet', row_group_size=2)
    sources = [dict(name='hf', kind='hf', path='json', data_files=str(tmp_path / 'rows.jsonl'), text_field='content', weight=1),
               dict(name='pq', kind='local', path=str(tmp_path / '*.parquet'), text_field='body', weight=1)]
    meta = build(config(tmp_path, sources))
    docs = read_documents(tmp_path / 'out', 'train', mistral)
    assert sorted(docs) == sorted(texts) and [d for d in docs if d in texts[6:]] == texts[6:]
    assert meta['cleaning']['hf']['kept'][0] == 6 and meta['cleaning']['pq']['kept'][0] == 3


def test_hf_data_dirs_are_interleaved_without_repeating_any(tmp_path, vocab, mistral):
    """the-stack-dedup's languages are data_dirs of one HF dataset, of very different sizes: each
    document is read exactly once (with dedup off, as config/data_moxin.py builds), the small
    language early, and none is repeated while the largest still has documents."""
    rng = np.random.default_rng(7)
    texts = {lang: [words_doc(rng, 60, vocab) for _ in range(n)] for lang, n in (('small', 2), ('large', 7))}
    for lang, docs in texts.items():
        (tmp_path / lang).mkdir()
        write_jsonl(tmp_path / lang / 'rows.jsonl', docs, field='content')
    source = dict(name='code', kind='hf', path='json', text_field='content', weight=1,
                  data_dirs=[str(tmp_path / 'small'), str(tmp_path / 'large')])
    build(config(tmp_path, [source], dedup=False))
    docs = read_documents(tmp_path / 'out', 'train', mistral)
    assert sorted(docs) == sorted(texts['small'] + texts['large'])
    assert set(docs[:4]) >= set(texts['small'])  # alternating while both have documents


@pytest.mark.parametrize('files, message', [
    ({'bad.txt': b'ok\n' * 300 + b'caf\xe9\n'}, r'bad.txt:301: invalid UTF-8 \(byte 0xe9\)$'),
    ({'bad.jsonl': b'{"text": "x"}\n{"text": "caf\xe9"}\n'}, r'bad.jsonl:2: invalid UTF-8'),
    ({'bad.jsonl': b'{"text": "x"}\n\n{"body": "x"}\n'}, r"bad.jsonl:3: no 'text' field$"),
    ({'bad.jsonl': b'{"text": null}\n'}, r"bad.jsonl:1: 'text' is NoneType, not a string$"),
    ({'bad.jsonl': b'{"text": "x"\n'}, r'bad.jsonl:1: not valid JSON'),
    ({'bad.parquet': None}, r"bad.parquet: no 'text' column \(columns: body\)$"),
    ({}, r'no .txt/.jsonl/.parquet files at .*missing$'),
    ({'0.txt': b'', '1.txt': b'', '2.jsonl': b'{"text": ""}\n'}, r'no training data: 0 documents kept after cleaning'),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, files, message):
    import pyarrow
    import pyarrow.parquet
    raw = tmp_path / 'raw'
    raw.mkdir()
    for name, content in files.items():
        if name.endswith('.parquet'):  # a parquet file without the configured column
            pyarrow.parquet.write_table(pyarrow.table({'body': ['x' * 300]}), raw / name)
        else:
            (raw / name).write_bytes(content)
    cfg = config(tmp_path, [dict(name='local', kind='local', path=str(raw if files else raw / 'missing'), weight=1)])
    with pytest.raises(ValueError, match=message) as e:
        build(cfg)
    assert '\n' not in str(e.value)
    assert not os.path.exists(cfg['out_dir']) or not any(f.endswith('.bin') for f in os.listdir(cfg['out_dir']))


@pytest.mark.parametrize('source, message', [
    (dict(name='x', kind='web', weight=1), r"sources\[0\] \(x\): kind must be one of"),
    (dict(name='x', kind='pydoc', weight=0), r'weight must be a positive number'),
    (dict(name='x', kind='local', path='.', weight=1, field='t'), r"unknown key\(s\) field for kind 'local'"),
    (dict(kind='pydoc', weight=1), r"missing 'name'"),
])
def test_bad_source_specs(tmp_path, source, message):
    with pytest.raises(ValueError, match=message):
        build(config(tmp_path, [source]))


def test_cli_builds_default_corpus_offline(tmp_path):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TIKTOKEN_CACHE_DIR': str(tmp_path)}
    run = lambda *args: subprocess.run([sys.executable, os.path.join(ROOT, 'data.py'), *args],
                                       capture_output=True, text=True, env=env, cwd=tmp_path)
    result = run('--out_dir=pydoc')
    assert result.returncode == 0, result.stderr
    meta = json.load(open(tmp_path / 'pydoc' / 'meta.json'))
    assert meta['split_tokens']['train'] > 1_000_000 and meta['split_tokens']['val'] >= DEFAULTS['val_tokens']
    assert set(meta['tokens']) == {'pydoc', 'stdlib'} and all(v['train'] for v in meta['tokens'].values())
    assert 'complete already' in run('--out_dir=pydoc').stdout
    bad = run('--out_dir=x', "--sources=[{'name': 'l', 'kind': 'local', 'path': 'nowhere', 'weight': 1}]")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: sources[0] (l): no .txt/.jsonl/.parquet files at nowhere"]


# ------------------------------------------------------------------- loader

@pytest.fixture
def shard_dir(tmp_path):
    """Three shards of distinct token values, so a window is identified by its first token."""
    lengths, start = [1000, 1500, 700], 0
    for i, n in enumerate(lengths):
        np.arange(start, start + n, dtype=np.uint16).tofile(tmp_path / f'train_{i:04d}.bin')
        start += n
    (tmp_path / 'meta.json').write_text(json.dumps({'dtype': 'uint16'}))
    return str(tmp_path)


def window_starts(loader, n_batches):
    starts = []
    for _ in range(n_batches):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (3, 16) and (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
        starts += x[:, 0].tolist()
    return starts


def test_loader_ranks_are_disjoint_and_cover_each_epoch_in_a_new_order(shard_dir):
    all_windows = {s + 16 * k for s, n in [(0, 1000), (1000, 1500), (2500, 700)] for k in range((n - 1) // 16)}
    ranks = [PackedLoader(shard_dir, 'train', 16, 3, rank=r, world_size=2, seed=7) for r in range(2)]
    assert ranks[0].steps_per_epoch == len(all_windows) // 6 == 33
    epoch1 = [window_starts(loader, 33) for loader in ranks]
    epoch2 = [window_starts(loader, 33) for loader in ranks]
    for epoch in (epoch1, epoch2):
        assert not set(epoch[0]) & set(epoch[1]) and set(epoch[0]) | set(epoch[1]) == all_windows
        assert len(epoch[0]) == len(set(epoch[0]))
    assert epoch1[0] != epoch2[0]
    assert window_starts(PackedLoader(shard_dir, 'train', 16, 3, world_size=2, seed=7), 33) == epoch1[0]
    assert window_starts(PackedLoader(shard_dir, 'train', 16, 3, world_size=2, seed=8), 33) != epoch1[0]


@pytest.mark.concept
def test_loader_resumes_exactly(shard_dir):
    uninterrupted = window_starts(PackedLoader(shard_dir, 'train', 16, 3, rank=1, world_size=2), 50)
    first = PackedLoader(shard_dir, 'train', 16, 3, rank=1, world_size=2)
    window_starts(first, 20)
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    resumed = PackedLoader(shard_dir, 'train', 16, 3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert window_starts(resumed, 30) == uninterrupted[60:]  # crosses into the second epoch
    with pytest.raises(ValueError, match='loader state has batch_size=3 but this loader has 4'):
        PackedLoader(shard_dir, 'train', 16, 4, rank=1, world_size=2).load_state_dict(state)


def test_loader_errors(tmp_path, shard_dir):
    with pytest.raises(ValueError, match='meta.json not found'):
        PackedLoader(str(tmp_path / 'nothing'), 'train', 16, 3)
    with pytest.raises(ValueError, match='has no val_NNNN.bin shards'):
        PackedLoader(shard_dir, 'val', 16, 3)
    with pytest.raises(ValueError, match='cannot fill one batch of 100 on each of 2 ranks'):
        PackedLoader(shard_dir, 'train', 16, 100, world_size=2)


LOW_NOFILE = """
import hashlib, json, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from dataloader import PackedLoader
digest, starts = hashlib.sha256(), [[], []]  # starts[epoch]: the first token of every row, both ranks
for rank in range(2):
    loader = PackedLoader(sys.argv[1], 'train', 16, 3, rank=rank, world_size=2, seed=11)
    for step in range(2 * loader.steps_per_epoch):
        x, y = loader.next_batch()
        assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
        digest.update(x.numpy().tobytes() + y.numpy().tobytes())
        starts[step // loader.steps_per_epoch] += x[:, 0].tolist()
print(json.dumps([digest.hexdigest(), starts]))
"""


def test_loader_reads_many_shards_with_few_open_files(tmp_path):
    """data/moxin has ~6,000 shards: the loader must not hold a file open per shard. 400 shards
    under a limit of 64 open files: each epoch reads distinct windows, and the batches are bit
    for bit the ones the memmap-per-shard loader gave (their digest, recorded before the change)."""
    rng, start, windows = np.random.default_rng(0), 0, set()
    for i in range(400):  # distinct token values, so a window is identified by its first token
        n = int(rng.integers(20, 120))
        np.arange(start, start + n, dtype=np.uint32).tofile(tmp_path / f'train_{i:04d}.bin')
        windows |= {start + 16 * k for k in range((n - 1) // 16)}
        start += n
    (tmp_path / 'meta.json').write_text(json.dumps({'dtype': 'uint32'}))
    result = subprocess.run([sys.executable, '-c', LOW_NOFILE, str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    digest, starts = json.loads(result.stdout)
    for epoch in starts:  # 2 ranks x batch 3 per step; the remainder of an epoch is dropped
        assert len(epoch) == len(set(epoch)) == len(windows) // 6 * 6 and set(epoch) <= windows
    assert starts[0] != starts[1]
    assert digest == 'b6e4d1ff608f85cfea8c6d3c22e6ddcd909cf3acdefebe20fa956f5a0e61151f'


# ------------------------------------------------------------------- chat

def byte_tokenizer(monkeypatch):
    """One token per byte, EOS = 256: masks can be checked character by character."""
    import tiktoken
    enc = tiktoken.Encoding('bytes', pat_str=r'.|\n', mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={'<|endoftext|>': 256})
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: enc)
    return Tokenizer.load('tiktoken:gpt2')


@pytest.mark.concept
def test_chat_mask_by_hand(monkeypatch):
    tok = byte_tokenizer(monkeypatch)
    messages = [dict(role='system', content='Be brief.'), dict(role='user', content='Hi?'),
                dict(role='assistant', content='Hello!'), dict(role='user', content='2+2?'),
                dict(role='assistant', content='4')]
    ids, mask = encode_chat(tok, messages, block_size=1000)
    E = '\x00'  # stands for the EOS token below
    text = f'<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\nHello!{E}\n<|user|>\n2+2?\n<|assistant|>\n4{E}\n'
    trained = [0] * len(text)
    for reply in ('Hello!' + E, '4' + E):  # the reply and its EOS, nothing else
        start = text.index('<|assistant|>\n' + reply) + len('<|assistant|>\n')
        trained[start:start + len(reply)] = [1] * len(reply)
    assert ids == [256 if c == E else ord(c) for c in text] and mask == trained
    assert encode_chat(tok, messages, block_size=20) == (ids[:20], mask[:20])
    with pytest.raises(ValueError, match=r"message 1: expected \{'role'"):
        encode_chat(tok, [messages[0], dict(role='bot', content='x')], 100)


def test_chat_matches_transformers_on_the_tulu_string(tmp_path, mistral):
    """The ids equal what open-instruct gets: HF's Mistral tokenizer on the whole formatted string."""
    messages = [dict(role='system', content='Be brief.'), dict(role='user', content='What is the capital of France?'),
                dict(role='assistant', content='Paris.'), dict(role='user', content='And of Italy?'),
                dict(role='assistant', content='Rome, of course.')]
    ids, mask = encode_chat(mistral, messages, block_size=4096)
    spans, span = [], []
    for i, m in zip(ids, mask):
        if m:
            span.append(i)
        elif span:
            spans, span = spans + [span], []
    assert [s[-1] for s in spans] == [mistral.eos_id] * 2
    assert [mistral.decode(s) for s in spans] == ['Paris.', 'Rome, of course.']
    pytest.importorskip('google.protobuf')
    from transformers import AutoTokenizer
    shutil.copy(importlib.resources.files('mistral_common') / 'data' / 'tokenizer.model.v1', tmp_path / 'tokenizer.model')
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(dict(
        tokenizer_class='LlamaTokenizer', add_bos_token=True, legacy=True, bos_token='<s>', eos_token='</s>')))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert ids == hf.encode('<|system|>\nBe brief.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis.</s>'
                            '\n<|user|>\nAnd of Italy?\n<|assistant|>\nRome, of course.</s>\n')


def test_capability_source_renders_eval_prompts(tmp_path, mistral):
    bench = tmp_path / 'bench'
    (bench / 'arc_easy').mkdir(parents=True)
    (bench / 'piqa').mkdir()
    (bench / 'arc_easy' / 'train.jsonl').write_text(json.dumps(
        {'question': 'Which is a planet?', 'choices': {'text': ['Sun', 'Mars'], 'label': ['A', 'B']}, 'answerKey': 'B'}) + '\n')
    (bench / 'piqa' / 'train.jsonl').write_text(json.dumps(
        {'goal': 'Open a jar', 'sol1': 'Twist the lid.', 'sol2': 'Eat the lid.', 'label': 0}) + '\n')
    source = dict(name='capability', kind='capability', tasks=['arc_easy', 'piqa:train'], data_dir=str(bench), weight=1)
    build(config(tmp_path, [source], min_chars=0))
    assert read_documents(tmp_path / 'out', 'train', mistral) == [
        'Question: Which is a planet?\nAnswer: Mars', 'Question: Open a jar\nAnswer: Twist the lid.']
    with pytest.raises(ValueError, match="unknown task 'arc'"):
        build(config(tmp_path, [{**source, 'tasks': ['arc']}]))
