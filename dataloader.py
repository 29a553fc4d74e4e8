"""
Batches for training, read from what data.py and sft.py prepare, each resumable exactly.

    PackedLoader(data_dir, split, ...)   pre-training: block_size + 1 token windows of the shards,
                                         packed across document boundaries
    ChatLoader(ids, mask, offsets, ...)  fine-tuning: whole conversations, right-padded, with
                                         targets -1 wherever there is nothing to learn
    PairLoader(ids, mask, offsets, ...)  preference tuning: micro-batches of (chosen, rejected) pairs
                                         fixed once, visited in a new order each epoch

Both share one contract: next_batch() -> (x, y) LongTensors; an epoch visits every window or
conversation once in a seeded order that is new each epoch; rank r of world_size takes every
world_size-th, so ranks never overlap and all take the same number of batches (the remainder of
an epoch is dropped); state_dict() / load_state_dict() resume exactly where a run stopped.
"""
import collections
import glob
import json
import os

import numpy as np
import torch


# ----------------------------------------------------------------------------- reading files (data.py and chats.py)

def decode_utf8(raw, path, line=None):
    """bytes -> str, or ValueError naming the file and the line of the first invalid byte."""
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
                    row = json.loads(decode_utf8(raw, path, n))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                yield n, row


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


# ----------------------------------------------------------------------------- training batches


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
        # no file stays open: data/moxin has ~6,000 shards, more than a usual `ulimit -n` allows
        self.paths, self.dtype = paths, np.dtype(meta['dtype'])
        self.windows = np.array([(os.path.getsize(p) // self.dtype.itemsize - 1) // block_size for p in paths])
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
            self._shard_order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths))
            self._ends = np.cumsum(self.windows[self._shard_order])
            self._cached_epoch, self._cached_shard = self.epoch, None
        j = int(np.searchsorted(self._ends, position, side='right'))
        shard = int(self._shard_order[j])
        if self._cached_shard != shard:  # positions come in order: one shard's permutation at a time
            self._window_order = np.random.default_rng([self.seed, self.epoch, shard]).permutation(self.windows[shard])
            self._cached_shard = shard
        return shard, int(self._window_order[position - (self._ends[j] - self.windows[shard])]) * self.block_size

    def next_batch(self):
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        first = self.step * self.batch_size * self.world_size
        rows = []
        for b in range(self.batch_size):
            shard, start = self._window(first + b * self.world_size + self.rank)
            rows.append(np.fromfile(self.paths[shard], self.dtype, self.block_size + 1, offset=start * self.dtype.itemsize))
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


def padded_rows(ids, mask, offsets, sequences):
    """(x, y) LongTensors [len(sequences), T] of the given sequences (sequence i is
    ids[offsets[i]:offsets[i + 1]]), right-padded to the longest: T is its length - 1, position t
    predicts token t + 1, and y = -1 wherever the mask is off or there is only padding. The padding
    is token 0: any id would do, since it follows every real token (causal attention never reads
    it) and is never a target."""
    spans = [slice(offsets[i], offsets[i + 1]) for i in sequences]
    T = max(s.stop - s.start for s in spans) - 1
    x = torch.zeros((len(spans), T), dtype=torch.long)
    y = torch.full((len(spans), T), -1, dtype=torch.long)
    for row, s in enumerate(spans):
        row_ids, row_mask = torch.from_numpy(ids[s].astype(np.int64)), torch.from_numpy(mask[s])
        n = len(row_ids) - 1
        x[row, :n] = row_ids[:-1]
        y[row, :n] = torch.where(row_mask[1:], row_ids[1:], -1)
    return x, y


class ChatLoader:
    """Micro-batches of whole conversations: (x, y) LongTensors [batch_size, T], T the longest
    conversation in the batch (at most block_size), y = -1 wherever there is nothing to learn.

    Padded, not packed: each row is one conversation, right-padded to the batch's longest with
    target -1. Causal attention never looks right, so the padding cannot change what a real token
    sees, and each conversation trains exactly as if alone; the loss is the mean over the batch's
    assistant tokens, as in open-instruct. Packing several conversations into one row would waste
    no compute on padding but needs an attention mask between them (model.py has none) so that one
    cannot attend into another; at batch_size 1, as in the 7B configs, there is no padding at all.

    Same contract as data.PackedLoader: an epoch visits every conversation once in a seeded
    order, new each epoch; rank r of world_size takes every world_size-th, so ranks never overlap
    and all take the same number of batches (the remainder of an epoch is dropped); state_dict()
    resumes exactly.
    """

    def __init__(self, ids, mask, offsets, batch_size, rank=0, world_size=1, seed=0):
        self.ids, self.mask, self.offsets = ids, mask, offsets
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.conversations = len(offsets) - 1
        self.steps_per_epoch = self.conversations // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.conversations} conversations cannot fill one batch of {batch_size} "
                             f"on each of {world_size} ranks")
        self.epoch, self.step, self._order_epoch = 0, 0, None

    def next_batch(self):
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.conversations)
            self._order_epoch = self.epoch
        first = self.step * self.batch_size * self.world_size
        picked = self._order[first + self.rank:first + self.batch_size * self.world_size:self.world_size]
        self.step += 1
        return padded_rows(self.ids, self.mask, self.offsets, picked)

    def state_dict(self):
        return dict(epoch=self.epoch, step=self.step, seed=self.seed, world_size=self.world_size,
                    batch_size=self.batch_size, conversations=self.conversations, tokens=len(self.ids))

    def load_state_dict(self, state):
        resume_position(self, state)


def resume_position(loader, state):
    """Continue `loader` (ChatLoader, PairLoader, grpo.py's PromptLoader: a state_dict of epoch, step
    and the settings) where its saved state_dict left off; a ValueError naming the setting when the
    data or batching differ from the checkpoint's."""
    mine = loader.state_dict()
    for key in [k for k in mine if k not in ('epoch', 'step')]:  # the settings, in a fixed order
        if state[key] != mine[key]:
            raise ValueError(f"{key}: the checkpoint has {state[key]}, this run {mine[key]}; resume with the "
                             f"same data and settings, or start a new out_dir")
    loader.epoch, loader.step = state['epoch'], state['step']


class PairLoader:
    """Micro-batches of preference pairs: (x, y, index), x and y [2B, T] as ChatLoader's, the B
    chosen conversations first, then their B rejected ones in the same order, and index [B] the
    pairs' numbers (pair i is sequences 2i and 2i + 1 of ids/offsets, see chats.load_pairs).

    The micro-batches themselves are drawn once, from the seed: groups of batch_size pairs of
    `pairs` (the last one smaller). So each pair is always computed beside the same others, in a
    batch of the same shape, whatever the epoch and however many ranks share the work: dpo.py
    computes the reference log-probs in these very groups, and the policy's at the first step
    equal them bit for bit. An epoch visits every group once in a seeded order, new each epoch;
    rank r of world_size takes every world_size-th group (the remainder of an epoch is dropped);
    state_dict() resumes exactly.
    """

    def __init__(self, ids, mask, offsets, pairs, batch_size, rank=0, world_size=1, seed=0):
        self.ids, self.mask, self.offsets = ids, mask, offsets
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        shuffled = np.random.default_rng(seed).permutation(np.asarray(pairs))
        self.groups = [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]
        self.pairs = len(shuffled)
        self.steps_per_epoch = len(self.groups) // world_size
        self.epoch, self.step, self._order_epoch = 0, 0, None

    def group(self, g):
        """The micro-batch of group g."""
        index = self.groups[g]
        sequences = np.concatenate([2 * index, 2 * index + 1])
        return (*padded_rows(self.ids, self.mask, self.offsets, sequences), torch.from_numpy(index.astype(np.int64)))

    def next_batch(self):
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups))
            self._order_epoch = self.epoch
        g = self._order[self.step * self.world_size + self.rank]
        self.step += 1
        return self.group(g)

    def state_dict(self):
        return dict(epoch=self.epoch, step=self.step, seed=self.seed, world_size=self.world_size,
                    batch_size=self.batch_size, pairs=self.pairs, tokens=len(self.ids))

    def load_state_dict(self, state):
        resume_position(self, state)
