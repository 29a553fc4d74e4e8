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
import importlib
import importlib.resources
import itertools
import json
import multiprocessing
import os
import re
import string
import sys
import sysconfig
import time
import unicodedata
import zlib

import numpy as np


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """One interface over the three tokenizer formats a checkpoint may come with.

    Special-token strings inside text (e.g. a literal "</s>" in a web page) are always
    encoded as plain text, so data can never inject a BOS/EOS; special tokens come
    only from add_special_tokens=True or from code that appends .eos_id itself.
    """

    def __init__(self, spec, kind, impl, vocab_size, bos_id, eos_id):
        self.spec, self.kind, self.impl = spec, kind, impl
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
        return cls(spec, 'sentencepiece', sp, sp.vocab_size(), none_if_negative(sp.bos_id()), none_if_negative(sp.eos_id()))

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
        return cls(spec, 'hf', tok, tok.get_vocab_size(with_added_tokens=True), bos, eos)

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
    'hf': {'path', 'text_field', 'data_dirs', '*'},   # datasets.load_dataset(streaming=True); other keys go to it
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
        return lambda: (open(p, encoding='utf-8').read() for p in _stdlib_files())
    if kind == 'local':
        files = _local_files(src.get('path'), where)
        return lambda: (doc for path in files for doc in _read_local(path, field))
    if kind == 'hf':
        if 'path' not in src:
            raise ValueError(f"{where}: missing 'path' (a Hugging Face dataset name)")
        kwargs = {k: v for k, v in src.items() if k not in ('name', 'kind', 'weight', 'text_field', 'data_dirs')}
        return lambda: _read_hf(kwargs, src.get('data_dirs'), field)
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


def _read_local(path, field):
    if path.endswith('.txt'):  # one file, one document
        with open(path, 'rb') as f:
            yield _decode(f.read(), path)
    elif path.endswith('.jsonl'):
        with open(path, 'rb') as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(_decode(raw, path, n))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
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
    if data_dirs:  # e.g. the-stack-dedup's per-language folders, interleaved so each language shows up early
        ds = datasets.interleave_datasets([datasets.load_dataset(**kwargs, data_dir=d) for d in data_dirs],
                                          stopping_strategy='all_exhausted')
    else:
        ds = datasets.load_dataset(**kwargs)
    for n, row in enumerate(ds):
        if field not in row:
            raise ValueError(f"{kwargs['path']} row {n}: no '{field}' field (fields: {', '.join(row)})")
        yield row[field] or ''


def _capability_docs(tasks, data_dir, where):
    """Phase 3: benchmark training splits rendered by eval.py itself, so the prompts match what is scored."""
    evaluate = importlib.import_module('eval')
    yield from evaluate.training_documents(tasks, data_dir)


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
            sig = np.minimum(sig, ((chunk[:, None] * self.mult + self.add) >> np.uint64(32)).min(axis=0, initial=2**32))
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


def _prepare_batch(texts):
    return [_worker(text) for text in texts]


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


def _prepared(docs, pool, batch_size=64, depth=8):
    """Yield pool-prepared documents in order, keeping at most `depth` batches in flight
    (Pool.imap would read the whole source ahead into memory)."""
    batches, pending = iter(lambda: list(itertools.islice(docs, batch_size)), []), collections.deque()
    while True:
        while len(pending) < depth and (batch := next(batches, None)):
            pending.append(pool.apply_async(_prepare_batch, (batch,)))
        if not pending:
            return
        yield from pending.popleft().get()
