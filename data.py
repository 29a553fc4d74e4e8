"""
data.py: from raw text to the token shards that pretrain.py trains on.

    text sources -> cleaning + dedup -> weighted mixture -> tokenizer -> shards on disk

Run `python data.py [config/file.py] [--key=value ...]` to build shards; the defaults
build a small text+code corpus from this Python interpreter's own docs and stdlib,
offline. dataloader.PackedLoader reads the shards back as batches.
"""
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import pathlib
import re
import string
import sys
import sysconfig
import time
import unicodedata
import zlib

import numpy as np
from tqdm import tqdm

from dataloader import decode_utf8, ordered_map, read_jsonl
from tasks import get_task, read_split, render_examples
from configurator import configure, settings
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------- settings (= the demo's)
out_dir = 'data/pydoc'
tokenizer = 'mistral'          # tokenizer.Tokenizer.load spec
# the embedded corpus: this interpreter's docs (text) and standard library (code), offline
sources = [dict(name='pydoc', kind='pydoc', weight=0.5), dict(name='stdlib', kind='stdlib', weight=0.5)]
max_tokens = 0                 # stop after this many tokens in all (0: when every source has run out)
val_tokens = 2**17             # the mixture's first documents, until this many tokens, go to val_0000.bin
shard_tokens = 2**22           # a shard closes at the first document boundary past this many tokens
min_chars = 200                # SlimPajama's rule; 0 keeps every document
dedup = True                   # exact + MinHash-LSH near-dedup across all sources
dedup_threshold = 0.8          # Jaccard similarity of word 13-gram sets
minhash_perms = 128
minhash_bands = 0              # 0: choose for dedup_threshold the way datasketch does (9 bands of 13 for 0.8/128)
workers = os.cpu_count()       # processes that clean, hash and tokenize
config_keys = settings(globals())


# ----------------------------------------------------------------------------- text sources
# A source is a dict from the config, e.g. dict(name='web', kind='local', path='data/raw/', weight=0.7).
# open_source() checks it up front (so a typo fails before anything is written) and returns a
# function that starts a fresh iterator over its documents, each a str.

SOURCE_KINDS = {
    'pydoc': set(),                                   # the interpreter's pydoc topics: English text
    'stdlib': set(),                                  # the interpreter's standard library .py files: code
    'local': {'path', 'text_field'},                  # a .txt/.jsonl/.parquet file, a directory of them, or a glob
    'hf': {'path', 'config', 'text_field', 'data_dirs', '*'},  # datasets.load_dataset(path, config, streaming=True, **rest)
    'capability': {'tasks', 'data_dir'},              # benchmark training splits in eval.py's prompt format
}


def open_source(src, index):
    where = f"sources[{index}] ({src.get('name', '?')})"
    kind = src.get('kind')
    if kind not in SOURCE_KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
    for key in ('name', 'weight'):
        if key not in src:
            raise ValueError(f"{where}: missing '{key}'")
    if not isinstance(src['weight'], (int, float)) or src['weight'] <= 0:
        raise ValueError(f"{where}: weight must be a positive number, got {src['weight']!r}")
    extra = set(src) - {'name', 'kind', 'weight'} - SOURCE_KINDS[kind]
    if extra and '*' not in SOURCE_KINDS[kind]:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(extra))} for kind '{kind}'")
    field = src.get('text_field', 'text')
    if kind == 'pydoc':
        from pydoc_data.topics import topics
        return lambda: (topics[k] for k in sorted(topics))
    if kind == 'stdlib':
        return lambda: (pathlib.Path(p).read_text(encoding='utf-8') for p in _stdlib_files())
    if kind == 'local':
        files = _local_files(src.get('path'), where)
        return lambda: (doc for path in files for doc in _read_local(path, field))
    if kind == 'hf':
        if 'path' not in src:
            raise ValueError(f"{where}: missing 'path' (a Hugging Face dataset name)")
        # 'name' labels the source here, so the dataset's own config name is given as 'config'
        kwargs = {k: v for k, v in src.items() if k not in ('name', 'kind', 'weight', 'text_field', 'data_dirs', 'config')}
        return lambda: _read_hf({**kwargs, 'name': src.get('config')}, src.get('data_dirs'), field)
    _capability_tasks(src.get('tasks'), where)  # fail on a typo now, not after hours of other sources
    return lambda: _capability_docs(src.get('tasks'), src.get('data_dir'), where)


def _stdlib_files():
    root = sysconfig.get_paths()['stdlib']
    for dirpath, dirs, files in os.walk(root):
        # test suites are mostly fixtures and odd encodings; installed packages are not the stdlib
        dirs[:] = sorted(d for d in dirs if d not in ('site-packages', '__pycache__', 'test', 'tests', 'idle_test'))
        yield from (os.path.join(dirpath, f) for f in sorted(files) if f.endswith('.py'))


LOCAL_SUFFIXES = ('.txt', '.jsonl', '.parquet')


def _local_files(path, where):
    if not isinstance(path, str):
        raise ValueError(f"{where}: missing 'path' (a file, a directory or a glob)")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, '**', '*'), recursive=True))
    else:
        files = sorted(glob.glob(path, recursive=True))
    files = [f for f in files if f.endswith(LOCAL_SUFFIXES) and os.path.isfile(f)]
    if not files:
        raise ValueError(f"{where}: no {'/'.join(LOCAL_SUFFIXES)} files at {path}")
    return files


def _read_local(path, field):
    if path.endswith('.txt'):  # one file, one document
        with open(path, 'rb') as f:
            yield decode_utf8(f.read(), path)
    elif path.endswith('.jsonl'):
        for n, row in read_jsonl(path):
            if not isinstance(row, dict) or field not in row:
                raise ValueError(f"{path}:{n}: no '{field}' field")
            if not isinstance(row[field], str):
                raise ValueError(f"{path}:{n}: '{field}' is {type(row[field]).__name__}, not a string")
            yield row[field]
    else:
        import pyarrow.parquet
        table = pyarrow.parquet.ParquetFile(path)
        if field not in table.schema_arrow.names:
            raise ValueError(f"{path}: no '{field}' column (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=[field]):  # row groups one at a time, never the whole file
            yield from (text or '' for text in batch.column(0).to_pylist())


def _read_hf(kwargs, data_dirs, field):
    import datasets
    kwargs = {'split': 'train', **kwargs, 'streaming': True}
    try:
        if data_dirs:  # e.g. the-stack-dedup's per-language folders, interleaved so each language shows up
            # early; each document once: 'all_exhausted' would repeat the small ones until the largest ends
            ds = datasets.interleave_datasets([datasets.load_dataset(**kwargs, data_dir=d) for d in data_dirs],
                                              stopping_strategy='all_exhausted_without_replacement')
        else:
            ds = datasets.load_dataset(**kwargs)
    except Exception as e:  # offline, gated, misspelt: the library's messages run to many lines
        raise ValueError(f"cannot stream {kwargs['path']}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
    for n, row in enumerate(ds):
        if field not in row:
            raise ValueError(f"{kwargs['path']} row {n}: no '{field}' field (fields: {', '.join(row)})")
        yield row[field] or ''


def _capability_tasks(tasks, where):
    """[(task, split)] from names like 'arc_easy' (its training split) or 'mmlu:auxiliary_train'."""
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise ValueError(f"{where}: 'tasks' must be a non-empty list of benchmark task names (tasks.TASKS)")
    pairs = []
    for spec in tasks:
        name, _, split = str(spec).partition(':')
        task = get_task(name)
        pairs.append((task, split or task.fewshot_split))
    return pairs


def _capability_docs(tasks, data_dir, where):
    """Phase 3: benchmark training splits rendered by the tasks module, in exactly the prompt
    format eval.py scores with; one solved question per document."""
    for task, split in _capability_tasks(tasks, where):
        rows, _ = read_split(task, split, data_dir)
        yield from render_examples(task.name, rows)


# ----------------------------------------------------------------------------- cleaning and dedup

def long_enough(text, min_chars=200):
    """SlimPajama's length rule: count characters other than punctuation, spaces, newlines and tabs."""
    return len(text.translate(_NOT_COUNTED)) >= min_chars


_NOT_COUNTED = str.maketrans('', '', string.punctuation + ' \n\t')


def normalise(text):
    """The form exact dedup compares: Unicode NFC, lower case, whitespace runs as one space."""
    return ' '.join(unicodedata.normalize('NFC', text).lower().split())


def lsh_bands(threshold, num_perm):
    """Bands for LSH that put the candidate S-curve's threshold at `threshold`: datasketch's rule,
    the (bands, rows) with the least false-positive plus false-negative area."""
    s = np.linspace(0, 1, 1001)
    best = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1 - (1 - s ** rows) ** bands  # probability that documents of Jaccard s share a band
            error = np.where(s < threshold, p, 1 - p).mean()  # ~ the integral over [0, 1]
            if best is None or error < best[0]:
                best = (error, bands)
    return best[1]


class MinHash:
    """MinHash signatures of a document's set of lower-cased word n-grams.

    Two documents agree at each signature position with probability equal to the Jaccard
    similarity of their n-gram sets. Position j hashes each n-gram with its own random
    multiply-shift function and keeps the minimum; all positions at once, with numpy.
    """

    def __init__(self, num_perm=128, bands=9, ngram=13, seed=0):
        rng = np.random.default_rng(seed)
        self.num_perm, self.bands, self.rows, self.ngram = num_perm, bands, num_perm // bands, ngram
        self.mult = rng.integers(0, 2**64, (1, num_perm), dtype=np.uint64) | np.uint64(1)
        self.add = rng.integers(0, 2**64, (1, num_perm), dtype=np.uint64)
        self.gram_mult = rng.integers(0, 2**64, ngram, dtype=np.uint64) | np.uint64(1)

    def ngram_hashes(self, text):
        """32-bit hashes of the distinct word n-grams (a shorter document is one n-gram)."""
        words = np.array([zlib.crc32(w.encode()) for w in re.findall(r'\w+', text.lower())], dtype=np.uint64)
        n = max(len(words) - self.ngram + 1, 1)
        h = np.zeros(n, dtype=np.uint64)
        for k in range(min(self.ngram, len(words))):  # a random linear mix of the n words (wraps mod 2^64)
            h += words[k:k + n] * self.gram_mult[k]
        return np.unique(h >> np.uint64(32))

    def signature(self, text):
        hashes = self.ngram_hashes(text)
        sig = np.full(self.num_perm, 2**32, dtype=np.uint64)
        for chunk in np.array_split(hashes, max(1, len(hashes) // 4096)):  # bounds memory on long documents
            sig = np.minimum(sig, ((chunk[:, None] * self.mult + self.add) >> np.uint64(32)).min(axis=0))
        return sig.astype(np.uint32)

    def band_keys(self, sig):
        """One 64-bit key per band of `rows` signature positions: equal keys = a candidate pair."""
        rows = sig[:self.bands * self.rows].reshape(self.bands, self.rows)
        return [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), 'little') for r in rows]


class Dedup:
    """Streaming dedup: the first copy is kept, later exact or near (LSH band collision) copies dropped."""

    def __init__(self, bands):
        self.digests, self.tables = set(), [set() for _ in range(bands)]

    def check(self, digest, keys):
        if digest in self.digests:
            return 'exact_dup'
        if any(key in table for key, table in zip(keys, self.tables)):
            return 'near_dup'
        self.digests.add(digest)
        for key, table in zip(keys, self.tables):
            table.add(key)
        return None

    def arrays(self):
        return {'digests': np.array(sorted(self.digests), dtype='S16'),
                **{f'band{i}': np.array(sorted(t), dtype=np.uint64) for i, t in enumerate(self.tables)}}

    def load_arrays(self, arrays):
        self.digests = set(arrays['digests'].tolist())
        self.tables = [set(arrays[f'band{i}'].tolist()) for i in range(len(self.tables))]


# ----------------------------------------------------------------------------- worker processes
# Workers do everything per document that needs no global state: the length rule, hashing and
# tokenizing. The main process keeps the dedup tables and decides, in a fixed order.

def _init_worker(settings):
    global _worker
    _worker = Preparer(**settings)


def _prepare(text):  # in a worker process
    return _worker(text)


class Preparer:
    def __init__(self, tokenizer, min_chars, num_perm, bands):
        self.tok, self.min_chars = Tokenizer.load(tokenizer), min_chars
        self.minhash = MinHash(num_perm, bands) if bands else None
        self.dtype = np.uint16 if self.tok.vocab_size < 2**16 else np.uint32

    def __call__(self, text):
        """-> (bytes, None if too short else (digest, band keys, token ids with BOS/EOS around))."""
        nbytes = len(text.encode())
        if not long_enough(text, self.min_chars):
            return nbytes, None
        digest = hashlib.blake2b(normalise(text).encode(), digest_size=16).digest()
        keys = self.minhash.band_keys(self.minhash.signature(text)) if self.minhash else []
        ids = ([self.tok.bos_id] if self.tok.bos_id is not None else []) + self.tok.encode(text) + [self.tok.eos_id]
        return nbytes, (digest, keys, np.array(ids, dtype=self.dtype))


# ----------------------------------------------------------------------------- tokenize to shards

STEPS = ('short', 'exact_dup', 'near_dup', 'kept')


def _settings(cfg):  # what decides the shards' contents; a resumed run must not mix two of them
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in ('out_dir', 'workers')}))


def _save_atomic(path, write):
    with open(path + '.tmp', 'wb') as f:
        write(f)
    os.replace(path + '.tmp', path)  # a reader sees the old file or the whole new one, never half


class ShardWriter:
    """The shards of one build and the progress that led to them. Documents are appended to a
    buffer; a full buffer becomes the next shard (val first, `val_tokens` of it, then train shards of
    about `shard_tokens`), and after each shard the progress (documents read per source, tokens per
    shard, the cleaning counts and the dedup tables) is saved, so a stopped build resumes after its
    last finished shard."""

    def __init__(self, out, cfg, settings, dedup):
        self.out, self.dedup = out, dedup
        self.val_tokens, self.shard_tokens = cfg['val_tokens'], cfg['shard_tokens']
        self.state_path = os.path.join(out, 'state.npz')
        names = [s['name'] for s in cfg['sources']]
        self.progress = dict(settings=settings, consumed=[0] * len(names), shards={'train': [], 'val': []},
                             tokens={n: {'train': 0, 'val': 0} for n in names},
                             cleaning={n: {step: [0, 0] for step in STEPS} for n in names})  # [documents, bytes]
        if os.path.exists(self.state_path):
            with np.load(self.state_path) as saved:
                self.progress = json.loads(str(saved['progress']))
                if self.progress['settings'] != settings:
                    raise ValueError(f"{out} holds a partial build with other settings; choose another out_dir or delete it")
                dedup.load_arrays(saved)
            print(f"resuming {out} after shards {self.progress['shards']}")
        self.split = 'val' if self.val_tokens and not self.progress['shards']['val'] else 'train'
        self.buffer, self.buffer_tokens = [], 0

    def source_tokens(self, name):
        return sum(self.progress['tokens'][name].values())

    def count(self, name, step, nbytes):
        """One document read from source `name`, and what cleaning made of it (a STEPS name)."""
        self.progress['cleaning'][name][step][0] += 1
        self.progress['cleaning'][name][step][1] += nbytes

    def add(self, name, ids):
        self.buffer.append(ids)
        self.buffer_tokens += len(ids)
        self.progress['tokens'][name][self.split] += len(ids)
        if self.buffer_tokens >= (self.val_tokens if self.split == 'val' else self.shard_tokens):
            self.close_shard()
            self.split = 'train'

    def close_shard(self):
        if not self.buffer:
            return
        shards = self.progress['shards'][self.split]
        _save_atomic(os.path.join(self.out, f"{self.split}_{len(shards):04d}.bin"), np.concatenate(self.buffer).tofile)
        shards.append(self.buffer_tokens)
        # the state goes after the shard: a kill in between only means redoing that shard
        _save_atomic(self.state_path, lambda f: np.savez(f, progress=json.dumps(self.progress), **self.dedup.arrays()))
        self.buffer, self.buffer_tokens = [], 0


def build(cfg):
    """Stream the configured sources through cleaning, dedup and the mixture into token shards."""
    out, settings = cfg['out_dir'], _settings(cfg)
    opened = [open_source(src, i) for i, src in enumerate(cfg['sources'])]
    if not opened or len({s['name'] for s in cfg['sources']}) < len(opened):
        raise ValueError("sources must be a non-empty list of sources with distinct names")
    tok = Tokenizer.load(cfg['tokenizer'])
    if tok.eos_id is None:
        raise ValueError(f"tokenizer {tok.spec} has no EOS token to end documents with")
    meta_path = os.path.join(out, 'meta.json')
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta.get('settings') != settings:
            raise ValueError(f"{out} holds shards built with other settings; choose another out_dir or delete it")
        print(f"{out} is complete already: {meta['split_tokens']}")
        return meta
    os.makedirs(out, exist_ok=True)

    names, weights = [s['name'] for s in cfg['sources']], [s['weight'] for s in cfg['sources']]
    bands = (cfg['minhash_bands'] or lsh_bands(cfg['dedup_threshold'], cfg['minhash_perms'])) if cfg['dedup'] else 0
    dedup = Dedup(bands)
    shards = ShardWriter(out, cfg, settings, dedup)
    progress = shards.progress
    t0, docs_seen, tokens_seen = time.time(), 0, 0
    worker_settings = dict(tokenizer=cfg['tokenizer'], min_chars=cfg['min_chars'], num_perm=cfg['minhash_perms'], bands=bands)
    active = list(range(len(names)))
    total = sum(shards.source_tokens(n) for n in names)
    with multiprocessing.Pool(max(1, cfg['workers']), _init_worker, (worker_settings,)) as pool, \
            tqdm(total=cfg['max_tokens'] or None, initial=total, unit='tok', unit_scale=True, dynamic_ncols=True) as bar:
        # a resumed run re-reads (but does not prepare) the documents that went into finished shards
        streams = [ordered_map(pool, _prepare, itertools.islice(make(), skip, None))
                   for make, skip in zip(opened, progress['consumed'])]
        while active and not (cfg['max_tokens'] and total >= cfg['max_tokens']):
            # mixture by tokens: the source furthest below its share gives the next document
            i = min(active, key=lambda i: (shards.source_tokens(names[i]) / weights[i], i))
            doc = next(streams[i], None)
            if doc is None:  # a source that runs out leaves the mixture; the others go on
                active.remove(i)
                continue
            progress['consumed'][i] += 1
            docs_seen += 1
            nbytes, prepared = doc
            step = 'short' if prepared is None else (dedup.check(*prepared[:2]) if cfg['dedup'] else None) or 'kept'
            shards.count(names[i], step, nbytes)
            if step == 'kept':
                shards.add(names[i], prepared[2])
                total += len(prepared[2])
                tokens_seen += len(prepared[2])
                bar.update(len(prepared[2]))
    shards.close_shard()
    train_tokens = sum(progress['shards']['train'])
    if not train_tokens:
        kept = sum(c['kept'][0] for c in progress['cleaning'].values())
        raise ValueError(f"no training data: {kept} documents kept after cleaning, "
                         f"{sum(progress['shards']['val'])} tokens of them went to val (val_tokens={cfg['val_tokens']})")
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    meta = dict(tokenizer=tok.spec, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                dtype=np.dtype(dtype).name, shards=progress['shards'],
                split_tokens={s: sum(n) for s, n in progress['shards'].items()},
                tokens=progress['tokens'], cleaning=progress['cleaning'], settings=settings)
    _save_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    os.remove(shards.state_path)
    _report(meta, docs_seen, tokens_seen, time.time() - t0)
    return meta


def _report(meta, docs, tokens, seconds):
    print(f"{'source':<16}" + ''.join(f"{s + ' docs':>16}{'MB':>9}" for s in STEPS) + f"{'train tok':>13}{'val tok':>11}")
    for name, steps in meta['cleaning'].items():
        print(f"{name:<16}" + ''.join(f"{steps[s][0]:>16}{steps[s][1] / 1e6:>9.2f}" for s in STEPS)
              + f"{meta['tokens'][name]['train']:>13}{meta['tokens'][name]['val']:>11}")
    print(f"this run: {docs} documents read, {tokens} tokens written in {seconds:.1f}s "
          f"({docs / max(seconds, 1e-9):.0f} docs/s, {tokens / max(seconds, 1e-9):.0f} tok/s); "
          f"dataset: {meta['split_tokens']} tokens")


# ----------------------------------------------------------------------------- command line

if __name__ == '__main__':
    configure(globals(), config_keys)
    try:
        build({k: globals()[k] for k in config_keys})
    except ValueError as e:
        sys.exit(f"error: {e}")
