"""
data.py: from raw text to the token batches that pretrain.py and sft.py train on.

    text sources -> cleaning + dedup -> weighted mixture -> tokenizer -> shards on disk
    shards on disk -> PackedLoader -> (x, y) batches       chat messages -> encode_chat

Run `python data.py [config/file.py] [--key=value ...]` to build shards; the defaults
build a small text+code corpus from this Python interpreter's own docs and stdlib,
offline. Other stages import Tokenizer, PackedLoader and encode_chat from here.
"""
import collections
import glob
import hashlib
import importlib.resources
import itertools
import json
import multiprocessing
import os
import pathlib
import re
import string
import shutil
import sys
import sysconfig
import time
import unicodedata
import zlib

import numpy as np
from tqdm import tqdm


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """One interface over the three tokenizer formats a checkpoint may come with.

    Special-token strings inside text (e.g. a literal "</s>" in a web page) are always
    encoded as plain text, so data can never inject a BOS/EOS; special tokens come
    only from add_special_tokens=True or from code that appends .eos_id itself.
    """

    def __init__(self, spec, kind, impl, vocab_size, bos_id, eos_id, path=None):
        self.spec, self.kind, self.impl, self.path = spec, kind, impl, path
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id

    @classmethod
    def load(cls, spec):
        if spec == 'mistral':  # Mistral's v1 SentencePiece model, the one Moxin-7B uses
            return cls._sentencepiece(spec, str(importlib.resources.files('mistral_common') / 'data' / 'tokenizer.model.v1'))
        if spec.startswith('tiktoken:'):
            return cls._tiktoken(spec, spec.removeprefix('tiktoken:'))
        if os.path.isdir(spec):  # an HF model dir: tokenizer.json is what transformers prefers too
            for name in ('tokenizer.json', 'tokenizer.model'):
                if os.path.isfile(os.path.join(spec, name)):
                    return cls._from_file(spec, os.path.join(spec, name))
            raise ValueError(f"tokenizer dir {spec} has neither tokenizer.json nor tokenizer.model")
        if os.path.isfile(spec):
            return cls._from_file(spec, spec)
        raise ValueError(f"tokenizer '{spec}' is not 'mistral', 'tiktoken:NAME', or an existing file or directory")

    @classmethod
    def _from_file(cls, spec, path):
        if path.endswith('.json'):
            return cls._hf_json(spec, path)
        return cls._sentencepiece(spec, path)

    @classmethod
    def _sentencepiece(cls, spec, path):
        import sentencepiece
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a SentencePiece model: {str(e).splitlines()[0]}") from None
        none_if_negative = lambda i: i if i >= 0 else None
        return cls(spec, 'sentencepiece', sp, sp.vocab_size(), none_if_negative(sp.bos_id()), none_if_negative(sp.eos_id()), path)

    @classmethod
    def _tiktoken(cls, spec, name):
        import tiktoken
        if name not in tiktoken.list_encoding_names():
            raise ValueError(f"unknown tiktoken encoding '{name}' (known: {', '.join(tiktoken.list_encoding_names())})")
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # every encoding downloads its BPE file on first use
            raise ValueError(f"tiktoken encoding '{name}' is not cached and could not be downloaded "
                             f"({type(e).__name__}); run it once with network access or set TIKTOKEN_CACHE_DIR") from None
        tok = cls(spec, 'tiktoken', enc, enc.n_vocab, None, enc.eot_token)
        tok.special_ids = {enc.encode_single_token(t) for t in enc.special_tokens_set}
        return tok

    @classmethod
    def _hf_json(cls, spec, path):
        import tokenizers
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path} is not a tokenizers JSON file: {str(e).splitlines()[0]}") from None
        tok.encode_special_tokens = True  # see the class docstring
        # transformers keeps the names of BOS/EOS beside tokenizer.json; fall back to the usual names
        config_path = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
        config = json.load(open(config_path)) if os.path.isfile(config_path) else {}
        def special(key, usual):
            name = config.get(key)
            names = [name.get('content') if isinstance(name, dict) else name] if name else usual
            ids = [tok.token_to_id(n) for n in names if n and tok.token_to_id(n) is not None]
            return ids[0] if ids else None
        bos = special('bos_token', ['<s>', '<|begin_of_text|>', '<|startoftext|>'])
        eos = special('eos_token', ['</s>', '<|end_of_text|>', '<|endoftext|>', '<|eot_id|>'])
        return cls(spec, 'hf', tok, tok.get_vocab_size(with_added_tokens=True), bos, eos, path)

    def encode(self, text, add_special_tokens=False):
        if self.kind == 'sentencepiece':  # SentencePiece itself adds nothing; Mistral's convention is BOS only
            ids = self.impl.encode(text)
            return [self.bos_id] + ids if add_special_tokens and self.bos_id is not None else ids
        if self.kind == 'tiktoken':  # tiktoken has no default special tokens
            return self.impl.encode_ordinary(text)
        return self.impl.encode(text, add_special_tokens=add_special_tokens).ids  # the post_processor decides

    def decode(self, ids):
        """Text of `ids`, with BOS/EOS and other special tokens left out."""
        ids = [int(i) for i in ids]
        if self.kind == 'tiktoken':
            return self.impl.decode([i for i in ids if i not in self.special_ids])
        if self.kind == 'hf':
            return self.impl.decode(ids, skip_special_tokens=True)
        return self.impl.decode(ids)

    def save_hf(self, out_dir):
        """Write this tokenizer's files into an HF model directory (model.export_hf writes the weights)."""
        if self.kind == 'tiktoken':
            raise ValueError(f"tokenizer {self.spec}: a tiktoken encoding has no HF tokenizer file to export")
        os.makedirs(out_dir, exist_ok=True)
        if self.kind == 'hf':
            shutil.copy(self.path, os.path.join(out_dir, 'tokenizer.json'))
            config = os.path.join(os.path.dirname(self.path), 'tokenizer_config.json')
            if os.path.isfile(config):
                shutil.copy(config, os.path.join(out_dir, 'tokenizer_config.json'))
            return
        shutil.copy(self.path, os.path.join(out_dir, 'tokenizer.model'))
        # transformers reads a SentencePiece model through LlamaTokenizer, which adds BOS as Mistral's does
        config = dict(tokenizer_class='LlamaTokenizer', add_bos_token=True, add_eos_token=False, legacy=True,
                      bos_token='<s>', eos_token='</s>', unk_token='<unk>')
        with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
            json.dump(config, f, indent=2)

    def __repr__(self):
        return f"Tokenizer({self.spec!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


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


def _decode(raw, path, line=None):
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError as e:
        line = line or raw.count(b'\n', 0, e.start) + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def read_jsonl(path):
    """(line number, row) for every non-blank line of a .jsonl file, read as it goes; invalid
    UTF-8 or JSON raises ValueError naming the file and line. sft.py reads its chats with it."""
    with open(path, 'rb') as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    row = json.loads(_decode(raw, path, n))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                yield n, row


def _read_local(path, field):
    if path.endswith('.txt'):  # one file, one document
        with open(path, 'rb') as f:
            yield _decode(f.read(), path)
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
        if data_dirs:  # e.g. the-stack-dedup's per-language folders, interleaved so each language shows up early
            ds = datasets.interleave_datasets([datasets.load_dataset(**kwargs, data_dir=d) for d in data_dirs],
                                              stopping_strategy='all_exhausted')
        else:
            ds = datasets.load_dataset(**kwargs)
    except Exception as e:  # offline, gated, misspelt: the library's messages run to many lines
        raise ValueError(f"cannot stream {kwargs['path']}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
    for n, row in enumerate(ds):
        if field not in row:
            raise ValueError(f"{kwargs['path']} row {n}: no '{field}' field (fields: {', '.join(row)})")
        yield row[field] or ''


def _capability_tasks(tasks, where):
    """[(eval.py task, split)] from names like 'arc_easy' (its training split) or 'mmlu:auxiliary_train'."""
    import eval as evaluate  # needs torch; only this kind of source imports it
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise ValueError(f"{where}: 'tasks' must be a non-empty list of eval.py task names")
    pairs = []
    for spec in tasks:
        name, _, split = str(spec).partition(':')
        task = evaluate.get_task(name)
        pairs.append((task, split or task.fewshot_split))
    return evaluate, pairs


def _capability_docs(tasks, data_dir, where):
    """Phase 3: benchmark training splits rendered by eval.py's own code, so the model trains
    on exactly the prompt format it is scored with; one solved question per document."""
    evaluate, pairs = _capability_tasks(tasks, where)
    for task, split in pairs:
        rows, _ = evaluate.read_split(task, split, data_dir)
        yield from evaluate.render_examples(task.name, rows)


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


def ordered_map(pool, fn, items, batch_size=64, depth=8):
    """fn(item) for every item, computed by the pool's workers and yielded in order, with at most
    `depth` batches in flight (Pool.imap would read all of `items` ahead into memory). A
    ValueError raised while reading `items` is raised when its turn comes, so the results before
    it still arrive. fn must be a module-level function; sft.py tokenizes its chats with this too."""
    pending, failure, more = collections.deque(), None, True
    while True:
        while more and len(pending) < depth:
            batch = []
            try:
                for item in items:
                    batch.append(item)
                    if len(batch) == batch_size:
                        break
                else:
                    more = False
            except ValueError as e:
                failure, more = e, False
            if batch:
                pending.append(pool.apply_async(_map_batch, (fn, batch)))
        if not pending:
            if failure:
                raise failure
            return
        yield from pending.popleft().get()


def _map_batch(fn, batch):
    return [fn(item) for item in batch]


# ----------------------------------------------------------------------------- tokenize to shards

DEFAULTS = dict(
    out_dir='data/pydoc',
    tokenizer='mistral',
    # the embedded corpus: this interpreter's docs (text) and standard library (code), offline
    sources=[dict(name='pydoc', kind='pydoc', weight=0.5), dict(name='stdlib', kind='stdlib', weight=0.5)],
    max_tokens=0,           # stop after this many tokens in all (0: when every source has run out)
    val_tokens=2**17,       # the mixture's first documents, until this many tokens, go to val_0000.bin
    shard_tokens=2**22,     # a shard closes at the first document boundary past this many tokens
    min_chars=200,          # SlimPajama's rule; 0 keeps every document
    dedup=True,             # exact + MinHash-LSH near-dedup across all sources
    dedup_threshold=0.8,    # Jaccard similarity of word 13-gram sets
    minhash_perms=128,
    minhash_bands=0,        # 0: choose for dedup_threshold the way datasketch does (9 bands of 13 for 0.8/128)
    workers=os.cpu_count(),
)
STEPS = ('short', 'exact_dup', 'near_dup', 'kept')


def _settings(cfg):  # what decides the shards' contents; a resumed run must not mix two of them
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in ('out_dir', 'workers')}))


def _save_atomic(path, write):
    with open(path + '.tmp', 'wb') as f:
        write(f)
    os.replace(path + '.tmp', path)  # a reader sees the old file or the whole new one, never half


def build(cfg):
    """Stream the configured sources through cleaning, dedup and the mixture into token shards."""
    out, settings = cfg['out_dir'], _settings(cfg)
    opened = [open_source(src, i) for i, src in enumerate(cfg['sources'])]
    if not opened or len({s['name'] for s in cfg['sources']}) < len(opened):
        raise ValueError("sources must be a non-empty list of sources with distinct names")
    tok = Tokenizer.load(cfg['tokenizer'])
    if tok.eos_id is None:
        raise ValueError(f"tokenizer {tok.spec} has no EOS token to end documents with")
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    meta_path, state_path = os.path.join(out, 'meta.json'), os.path.join(out, 'state.npz')
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta.get('settings') != settings:
            raise ValueError(f"{out} holds shards built with other settings; choose another out_dir or delete it")
        print(f"{out} is complete already: {meta['split_tokens']}")
        return meta
    os.makedirs(out, exist_ok=True)

    names = [s['name'] for s in cfg['sources']]
    bands = (cfg['minhash_bands'] or lsh_bands(cfg['dedup_threshold'], cfg['minhash_perms'])) if cfg['dedup'] else 0
    dedup = Dedup(bands)
    progress = dict(settings=settings, consumed=[0] * len(names), shards={'train': [], 'val': []},
                    tokens={n: {'train': 0, 'val': 0} for n in names},
                    cleaning={n: {step: [0, 0] for step in STEPS} for n in names})  # [documents, bytes]
    if os.path.exists(state_path):  # resume after the last finished shard
        with np.load(state_path) as saved:
            progress = json.loads(str(saved['progress']))
            if progress['settings'] != settings:
                raise ValueError(f"{out} holds a partial build with other settings; choose another out_dir or delete it")
            dedup.load_arrays(saved)
        print(f"resuming {out} after shards {progress['shards']}")

    def source_tokens(i):
        return sum(progress['tokens'][names[i]].values())

    split = 'val' if cfg['val_tokens'] and not progress['shards']['val'] else 'train'
    buffer, buffer_tokens = [], 0
    t0, docs_seen, tokens_seen = time.time(), 0, 0

    def close_shard():
        nonlocal buffer, buffer_tokens
        path = os.path.join(out, f"{split}_{len(progress['shards'][split]):04d}.bin")
        _save_atomic(path, np.concatenate(buffer).tofile)
        progress['shards'][split].append(buffer_tokens)
        # the state goes after the shard: a kill in between only means redoing that shard
        _save_atomic(state_path, lambda f: np.savez(f, progress=json.dumps(progress), **dedup.arrays()))
        buffer, buffer_tokens = [], 0

    worker_settings = dict(tokenizer=cfg['tokenizer'], min_chars=cfg['min_chars'], num_perm=cfg['minhash_perms'], bands=bands)
    active = list(range(len(names)))
    weights = [src['weight'] for src in cfg['sources']]
    total = sum(map(source_tokens, active))
    with multiprocessing.Pool(max(1, cfg['workers']), _init_worker, (worker_settings,)) as pool, \
            tqdm(total=cfg['max_tokens'] or None, initial=total, unit='tok', unit_scale=True, dynamic_ncols=True) as bar:
        # a resumed run re-reads (but does not prepare) the documents that went into finished shards
        streams = [ordered_map(pool, _prepare, itertools.islice(make(), skip, None))
                   for make, skip in zip(opened, progress['consumed'])]
        while active and not (cfg['max_tokens'] and total >= cfg['max_tokens']):
            # mixture by tokens: the source furthest below its share gives the next document
            i = min(active, key=lambda i: (source_tokens(i) / weights[i], i))
            doc = next(streams[i], None)
            if doc is None:  # a source that runs out leaves the mixture; the others go on
                active.remove(i)
                continue
            progress['consumed'][i] += 1
            docs_seen += 1
            nbytes, prepared = doc
            if prepared is None:
                step = 'short'
            else:
                step = (dedup.check(*prepared[:2]) if cfg['dedup'] else None) or 'kept'
            progress['cleaning'][names[i]][step][0] += 1
            progress['cleaning'][names[i]][step][1] += nbytes
            if step != 'kept':
                continue
            ids = prepared[2]
            buffer.append(ids)
            buffer_tokens += len(ids)
            progress['tokens'][names[i]][split] += len(ids)
            total += len(ids)
            tokens_seen += len(ids)
            bar.update(len(ids))
            if buffer_tokens >= (cfg['val_tokens'] if split == 'val' else cfg['shard_tokens']):
                close_shard()
                split = 'train'
    if buffer:
        close_shard()
    seconds = time.time() - t0
    train_tokens = sum(progress['shards']['train'])
    if not train_tokens:
        kept = sum(c['kept'][0] for c in progress['cleaning'].values())
        raise ValueError(f"no training data: {kept} documents kept after cleaning, "
                         f"{sum(progress['shards']['val'])} tokens of them went to val (val_tokens={cfg['val_tokens']})")
    meta = dict(tokenizer=tok.spec, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                dtype=np.dtype(dtype).name, shards=progress['shards'],
                split_tokens={s: sum(n) for s, n in progress['shards'].items()},
                tokens=progress['tokens'], cleaning=progress['cleaning'], settings=settings)
    _save_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    os.remove(state_path)
    _report(meta, docs_seen, tokens_seen, seconds)
    return meta


def _report(meta, docs, tokens, seconds):
    print(f"{'source':<16}" + ''.join(f"{s + ' docs':>16}{'MB':>9}" for s in STEPS) + f"{'train tok':>13}{'val tok':>11}")
    for name, steps in meta['cleaning'].items():
        print(f"{name:<16}" + ''.join(f"{steps[s][0]:>16}{steps[s][1] / 1e6:>9.2f}" for s in STEPS)
              + f"{meta['tokens'][name]['train']:>13}{meta['tokens'][name]['val']:>11}")
    print(f"this run: {docs} documents read, {tokens} tokens written in {seconds:.1f}s "
          f"({docs / max(seconds, 1e-9):.0f} docs/s, {tokens / max(seconds, 1e-9):.0f} tok/s); "
          f"dataset: {meta['split_tokens']} tokens")


# ----------------------------------------------------------------------------- the packed loader

class PackedLoader:
    """Batches of consecutive block_size+1 token windows, packed across document boundaries.

    An epoch visits every window of the split once: shards in a seeded order, windows within
    each shard in a seeded order, both new each epoch. Rank r of world_size takes every
    world_size-th window of that sequence, so ranks never overlap; all ranks take the same
    number of batches per epoch (the remainder is dropped) and their state is identical.
    """

    def __init__(self, data_dir, split, block_size, batch_size, rank=0, world_size=1, seed=0):
        meta_path = os.path.join(data_dir, 'meta.json')
        if not os.path.isfile(meta_path):
            raise ValueError(f"{meta_path} not found: build the data with `python data.py` first (or wait for it to finish)")
        meta = json.load(open(meta_path))
        paths = sorted(glob.glob(os.path.join(data_dir, f'{split}_[0-9][0-9][0-9][0-9].bin')))
        if not paths:
            raise ValueError(f"{data_dir} has no {split}_NNNN.bin shards")
        self.shards = [np.memmap(p, dtype=meta['dtype'], mode='r') for p in paths]
        self.windows = np.array([(len(s) - 1) // block_size for s in self.shards])
        self.block_size, self.batch_size, self.rank, self.world_size, self.seed = block_size, batch_size, rank, world_size, seed
        self.steps_per_epoch = int(self.windows.sum()) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{data_dir} {split}: {self.windows.sum()} windows of {block_size + 1} tokens "
                             f"cannot fill one batch of {batch_size} on each of {world_size} ranks")
        self.epoch, self.step = 0, 0
        self._cached_epoch = self._cached_shard = None

    def _window(self, position):
        """The (shard, first token) of the position-th window of this epoch's sequence."""
        if self._cached_epoch != self.epoch:
            self._shard_order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
            self._ends = np.cumsum(self.windows[self._shard_order])
            self._cached_epoch, self._cached_shard = self.epoch, None
        j = int(np.searchsorted(self._ends, position, side='right'))
        shard = int(self._shard_order[j])
        if self._cached_shard != shard:  # positions come in order: one shard's permutation at a time
            self._window_order = np.random.default_rng([self.seed, self.epoch, shard]).permutation(self.windows[shard])
            self._cached_shard = shard
        return shard, int(self._window_order[position - (self._ends[j] - self.windows[shard])]) * self.block_size

    def next_batch(self):
        import torch  # here, so that building shards (and its worker processes) never loads torch
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        first = self.step * self.batch_size * self.world_size
        rows = []
        for b in range(self.batch_size):
            shard, start = self._window(first + b * self.world_size + self.rank)
            rows.append(self.shards[shard][start:start + self.block_size + 1])
        self.step += 1
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self):
        return dict(epoch=self.epoch, step=self.step, seed=self.seed, world_size=self.world_size,
                    block_size=self.block_size, batch_size=self.batch_size, windows=self.windows.tolist())

    def load_state_dict(self, state):
        for key in ('seed', 'world_size', 'block_size', 'batch_size', 'windows'):
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {self.state_dict()[key]!r}; "
                                 f"cannot resume exactly")
        self.epoch, self.step = state['epoch'], state['step']


# ----------------------------------------------------------------------------- chat format for SFT

CHAT_ROLES = ('system', 'user', 'assistant')


def encode_chat(tokenizer, messages, block_size=None, add_generation_prompt=False):
    """Token ids and loss mask (1 = trained on) of a conversation in Moxin's (Tulu's) template:

        <|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n...</s>\\n

    Tags are plain text; </s> is the EOS token, and BOS starts the conversation as it starts
    a pre-training document. The text between two EOS tokens is encoded in one piece, as a
    tokenizer sees a whole string, and the mask marks the tokens past the prefix that ends
    with "<|assistant|>\\n": the assistant's reply and its EOS. add_generation_prompt ends the
    ids with "<|assistant|>\\n", tokenized as in training, for the model to write the reply.
    """
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    mask, text = [0] * len(ids), ''
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get('role') not in CHAT_ROLES or not isinstance(message.get('content'), str):
            raise ValueError(f"message {n}: expected {{'role': one of {', '.join(CHAT_ROLES)}, 'content': str}}, got {message!r}")
        text += f"<|{message['role']}|>\n"
        if message['role'] != 'assistant':
            text += message['content'] + '\n'
            continue
        prompt, reply = tokenizer.encode(text), tokenizer.encode(text + message['content'])
        if reply[:len(prompt)] != prompt:
            raise ValueError(f"message {n}: tokenizer {tokenizer.spec} merges tokens across the '<|assistant|>\\n' tag")
        ids += reply + [tokenizer.eos_id]
        mask += [0] * len(prompt) + [1] * (len(reply) - len(prompt) + 1)
        text = '\n'
    if add_generation_prompt:
        text += '<|assistant|>\n'
    if text:  # the newline after the last EOS, or a prompt the model has not answered yet
        tail = tokenizer.encode(text)
        ids, mask = ids + tail, mask + [0] * len(tail)
    return ids[:block_size], mask[:block_size]


# ----------------------------------------------------------------------------- command line

if __name__ == '__main__':
    from configurator import configure
    config = dict(DEFAULTS)
    configure(config, list(config))
    try:
        build(config)
    except ValueError as e:
        sys.exit(f"error: {e}")
