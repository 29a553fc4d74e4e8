"""
The Moxin-7B network: a Mistral-style decoder-only transformer.

    tokens -> embedding -> n_layers x Block -> RMSNorm -> output head -> logits
    Block:  x = x + Attention(RMSNorm(x));  x = x + FeedForward(RMSNorm(x))

Attention uses grouped-query heads (n_heads queries share n_kv_heads keys/values),
rotary position embeddings and a sliding window: token i attends to keys
i-W+1 .. i, exactly W of them. At inference a rolling-buffer KV cache keeps only
the last W keys/values per layer, so decoding memory stops growing at W tokens.

Weights use the Hugging Face layout (the "rotate_half" RoPE convention), so HF
Mistral/Llama checkpoints load by renaming alone; weights.py reads and writes them
(and permutes Mistral's original interleaved-RoPE checkpoints at load time).

Generation, at the end: generate() decodes a batch of prompts of any lengths (what eval.py
and grpo.py call), stream() yields one prompt's tokens as they come (sample.py); both run
the same loop, _decode, choosing tokens as a Sampling (temperature, top_k, top_p) says.
"""
import copy
import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 36
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096  # None = full causal attention
    max_seq_len: int = 32768
    tie_embeddings: bool = False


PRESETS = {
    # moxin-llm-7b's HF config: 8,114,180,096 parameters
    "moxin-7b": dict(),
    # Mistral-7B-v0.1: the same shape with 32 layers
    "mistral-7b": dict(n_layers=32),
    # trains on 2 CPU cores in minutes; same vocabulary so the Mistral tokenizer fits
    "demo": dict(dim=256, n_layers=4, head_dim=64, hidden_dim=768, n_heads=4, n_kv_heads=2,
                 sliding_window=256, max_seq_len=1024, tie_embeddings=True),
    # HuggingFaceTB/SmolLM2-135M's shape (a Llama: no window, tied head): a real small model, on
    # which bench.py measures speed, since the demo's 32000-row head dominates all it does
    "smollm2-135m": dict(dim=576, n_layers=30, head_dim=64, hidden_dim=1536, n_heads=9, n_kv_heads=3,
                         vocab_size=49152, rope_theta=100000.0, sliding_window=None, max_seq_len=8192,
                         tie_embeddings=True),
    # for tests: every feature (GQA, window smaller than a sequence) at toy size
    "tiny": dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                 vocab_size=256, sliding_window=8, max_seq_len=128),
}


def model_args(preset, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}' (known: {', '.join(PRESETS)})")
    return ModelArgs(**{**PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # float32 inside: the mean of squares loses too much precision in bf16
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_cos_sin(positions, head_dim, theta):
    """cos/sin tables [B, 1, T, head_dim] for absolute positions [B, T] (one row each, broadcast
    over heads), in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # half-split layout: pair (j, j + head_dim/2)
    return angles.cos().unsqueeze(-3), angles.sin().unsqueeze(-3)


def apply_rope(x, cos, sin):
    """Rotate x [B, H, T, head_dim]: each pair (x_j, x_{j+d/2}) turns by its position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


def window_mask(q_pos, k_pos, window):
    """Boolean [B, 1, Tq, Tk]: may the query at q_pos [B, Tq] read the key at k_pos [B, Tk]?
    A key is readable when it is not in the future and is one of the last `window` positions
    (q-W+1 .. q); k_pos -1 marks an empty cache slot."""
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    return allowed


@functools.lru_cache(maxsize=8)
def window_blocks(T, window, device):
    """The sliding-window band of a whole sequence of T tokens (query i reads keys i-W+1 .. i) as
    FlexAttention's block mask, made once per (T, W, device): the form in which attend computes only
    the blocks that hold part of the band (torchtitan's sliding-window attention does the same)."""
    band = lambda b, h, q, k: (k <= q) & (q - k < window)
    return create_block_mask(band, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled, once, on first use (on CUDA): its fused kernel comes from torch.compile,
    and eager FlexAttention is a reference loop."""
    return torch.compile(flex_attention)


def attend(q, k, v, mask, causal=False):
    """softmax(q k^T / sqrt(head_dim), masked) v, for q [B, n_heads, Tq, hd] and k, v
    [B, n_kv_heads, Tk, hd]: each group of n_heads // n_kv_heads query heads reads one key/value
    head (grouped-query attention). mask: boolean [B, 1, Tq, Tk], True = may read; or None, and
    then query i reads keys 0..i if causal (a whole sequence) or every key (a decode step); or a
    BlockMask (window_blocks), for FlexAttention."""
    B, H, Tq, hd = q.shape
    group = H // k.shape[1]
    if isinstance(mask, BlockMask):  # the window's band as blocks (window_blocks)
        flex = compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, enable_gqa=group > 1)
    if Tq == 1 and group > 1:
        # one new token (a decode step): the query heads of a group become the query rows of their
        # key/value head, so the keys and values are read once, never copied per head, and any kernel
        # takes the mask (the same for every head of a row)
        y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], group, hd), k, v, attn_mask=mask)
        return y.view(B, H, 1, hd)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)
    if q.is_cuda and group > 1:
        # With enable_gqa, CUDA's SDPA takes a mask only in its math kernel, which writes out
        # float32 [B, H, Tq, Tk] scores; given one key/value head per query head, the fused
        # memory-efficient kernel takes the mask. (The CPU kernels take it either way, and there
        # the copy would only cost time.)
        k, v = repeat_kv(k, v, group)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)


def repeat_kv(k, v, group):
    """Key/value heads [B, n_kv_heads, T, hd] -> [B, n_kv_heads * group, T, hd]: each one copied for
    the `group` query heads that read it (head h reads key/value head h // group)."""
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        """x [B, T, dim] at the positions cos/sin were made for; with a cache, the new keys/values
        join the cached ones (of layer `layer`) and the queries read both."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # keys are cached already rotated
        if cache is not None:
            k, v = cache.keys_values(layer, k, v)
        # mask: which keys each query may read, decided in Transformer._mask (window, cache, rows)
        y = attend(q, k, v, mask, causal=cache is None)  # no cache: the keys are the queries' own sequence
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class KVCache:
    """
    Rolling-buffer cache: `capacity` slots per layer and row, and the key/value of absolute
    position p lives in slot p % capacity. With capacity == sliding_window the buffer always
    holds every key a new token may read, so it can roll forever; a smaller buffer (max_tokens)
    or a model with full attention cannot roll, and overflowing it is an error.
    Each row b has its own position pos[b] (tokens it has seen), so rows holding prompts of
    different lengths decode side by side. Rows may also take different numbers of new tokens in
    one call (ragged rows, right-padded: add's lengths, as mistral-inference's cache keeps its
    seqlens); then only each row's own tokens are stored and counted.
    """

    def __init__(self, args, batch_size, device, dtype, max_tokens=None):
        self.window = args.sliding_window
        capacity = args.sliding_window or args.max_seq_len
        if max_tokens is not None:
            capacity = min(capacity, max_tokens)
        self.capacity = capacity
        self.rolls = self.window is not None and capacity == self.window
        shape = (batch_size, args.n_kv_heads, capacity, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.pos = [0] * batch_size
        self.slots = None  # [B, T]: where keys_values puts the T new tokens of each row (see add)
        self.ragged = None  # rows of different lengths: (row, step) of each new token that is not padding

    def filled(self):
        """Slots in use, per row."""
        return [min(p, self.capacity) for p in self.pos]

    def slot_positions(self, seen):
        """[B, capacity]: the absolute position each slot holds once row b has seen seen[b]
        tokens, -1 where the slot is still empty."""
        seen = torch.tensor(seen, device=self.k[0].device)[:, None]
        slots = torch.arange(self.capacity, device=seen.device)
        newest = slots + self.capacity * torch.div(seen - 1 - slots, self.capacity, rounding_mode="floor")
        return torch.where(slots < seen, newest, -1)

    def add(self, T, lengths=None):
        """Take T <= capacity new tokens in every row (Transformer.hidden feeds longer prompts in
        chunks), or with lengths only the first lengths[b] of row b's T (the rest is padding, never
        stored; eval.py's ragged_hidden): fix the slots keys_values writes them to and advance pos.
        Returns the new tokens' positions [B, T] and the positions [B, Tk] of the keys that
        keys_values will return to them (see there), for the attention mask."""
        lengths = [T] * len(self.pos) if lengths is None else lengths
        b = max(range(len(lengths)), key=lambda b: self.pos[b] + lengths[b])  # the fullest row
        if not self.rolls and self.pos[b] + lengths[b] > self.capacity:
            raise ValueError(f"KV cache full: row {b} holds {self.pos[b]} tokens, and {lengths[b]} more "
                             f"exceed its {self.capacity} slots")
        seen, device = self.pos, self.k[0].device
        new_pos = torch.tensor(seen, device=device)[:, None] + torch.arange(T, device=device)
        self.slots = new_pos % self.capacity
        self.ragged = None
        if min(lengths) < T:  # some rows are padded: the (row, step) of each of their own tokens
            own = torch.arange(T, device=device) < torch.tensor(lengths, device=device)[:, None]
            self.ragged = own.nonzero(as_tuple=True)
        self.pos = [p + n for p, n in zip(seen, lengths)]
        if T == 1:
            return new_pos, self.slot_positions(self.pos)[:, :max(self.filled())]
        return new_pos, torch.cat([self.slot_positions(seen), new_pos], dim=1)

    def keys_values(self, layer, k, v):
        """Store the new keys/values [B, n_kv_heads, T, hd], each row in its own slots, and return
        those the new tokens attend to.
        One new token (a decode step): it goes into its slot first, overwriting position pos - W,
        the one key that has just left the window; the filled slots are then exactly the keys it
        may read, in slot order (attention does not care about order: RoPE is already applied).
        Several (prefill): the cached keys + the new ones, returned before the new ones overwrite
        slots that earlier queries of the same chunk still read; window_mask sorts them out."""
        if k.shape[2] == 1:
            self._store(layer, k, v)
            n = max(self.filled())
            return self.k[layer][:, :, :n], self.v[layer][:, :, :n]
        k_all = torch.cat([self.k[layer], k], dim=2)
        v_all = torch.cat([self.v[layer], v], dim=2)
        self._store(layer, k, v)
        return k_all, v_all

    def _store(self, layer, k, v):
        if self.ragged is None:
            index = self.slots[:, None, :, None].expand_as(k)  # [B, T] -> one slot per key element
            self.k[layer].scatter_(2, index, k)
            self.v[layer].scatter_(2, index, v)
        else:  # each row's own tokens alone: token (row, step) goes to its row's slot slots[row, step]
            rows, steps = self.ragged
            slots = self.slots[rows, steps]
            self.k[layer][rows, :, slots] = k[rows, :, steps]
            self.v[layer][rows, :, slots] = v[rows, :, steps]

    def select(self, rows):
        """A new cache whose row i is a copy of row rows[i]: one prefix, several continuations."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.k[0].device)
        new = copy.copy(self)
        new.k = [t.index_select(0, index) for t in self.k]
        new.v = [t.index_select(0, index) for t in self.v]
        new.pos = [self.pos[r] for r in rows]
        return new

    def row(self, b):
        """Row b alone, as a cache sharing this one's memory: what it stores lands in row b here
        (its pos is its own list: copy it back)."""
        new = copy.copy(self)
        new.k = [t[b:b + 1] for t in self.k]
        new.v = [t[b:b + 1] for t in self.v]
        new.pos = [self.pos[b]]
        return new

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        if args.n_heads % args.n_kv_heads:
            raise ValueError(f"n_heads={args.n_heads} is not a multiple of n_kv_heads={args.n_kv_heads}")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.args.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None):
        logits = self.logits(self.hidden(idx, cache))
        loss = None
        if targets is not None:
            # reshape: targets are often a shifted (non-contiguous) view of the batch
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def token_logprobs(self, idx, targets):
        """log p(targets[b, t] | idx[b, :t + 1]) [B, T] in float32, 0 where targets is -1. The head
        runs only where there is a target (DPO's and GRPO's responses), so the [B, T, vocab] logits
        of every position, prompts and padding included, are never made."""
        h = self.hidden(idx)
        scored = targets != -1
        out = torch.zeros(targets.shape, dtype=torch.float32, device=idx.device)
        out[scored] = -F.cross_entropy(self.logits(h[scored]), targets[scored], reduction="none")
        return out

    def logits(self, h):
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, weight).float()

    def hidden(self, idx, cache=None):
        """Final-norm hidden states [B, T, dim] of the tokens idx [B, T]. Without a cache the rows
        start at position 0; with one, row b continues from cache.pos[b] and the cache keeps the
        new keys/values, taking a prompt longer than its capacity in chunks of at most that many
        tokens, so attention memory stays bounded."""
        if cache is None:
            positions = torch.arange(idx.shape[1], device=idx.device)[None]
            return self.norm(self._blocks(idx, positions, positions, None))
        chunks = []
        for start in range(0, idx.shape[1], cache.capacity):
            chunk = idx[:, start:start + cache.capacity]
            q_pos, k_pos = cache.add(chunk.shape[1])
            chunks.append(self._blocks(chunk, q_pos, k_pos, cache))
        return self.norm(torch.cat(chunks, dim=1))

    def _blocks(self, idx, q_pos, k_pos, cache):
        """The layers over tokens idx at positions q_pos [B, T] whose keys (cached and new) are at k_pos."""
        mask = self._mask(q_pos, k_pos, cache)
        cos, sin = rope_cos_sin(q_pos, self.args.head_dim, self.args.rope_theta)
        x = self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos.to(x.dtype), sin.to(x.dtype), mask, cache, i)
        return x

    def _mask(self, q_pos, k_pos, cache):
        """The one place that decides the attention mask. None where attention needs none, so
        SDPA can run its fastest kernels (see attend):
          - a whole sequence (no cache) no longer than W, or with no window: plain causal
            (pre-training phases 1 and 2, at 2k and 4k);
          - a decode step in which every row has filled as many slots as the others: the
            filled slots are exactly the keys it may read (KVCache.keys_values).
        Otherwise window_mask: the window's band past W tokens, a cache's empty slots, rows of
        a batch at different positions. On CUDA a whole sequence longer than W (GRPO at 8k-24k,
        SFT at 8k) gets the band as blocks instead (window_blocks): no [T, T] mask, and the blocks
        wholly outside the band are never computed."""
        W = self.args.sliding_window
        if cache is None and (W is None or q_pos.shape[1] <= W):
            return None
        if cache is not None and q_pos.shape[1] == 1 and len(set(cache.filled())) == 1:
            return None
        if cache is None and q_pos.is_cuda:
            return window_blocks(q_pos.shape[1], W, q_pos.device)
        return window_mask(q_pos, k_pos, W)


# ----------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class Sampling:
    """How decoding picks each next token: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) cut to the top_k tokens (0 = all) and the top_p probability
    mass (1 = all). A setting out of range is a ValueError here, where it is made."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")


GREEDY = Sampling()


def generate(model, prompts, max_new_tokens, sampling=GREEDY, *, eos_id=None, stop=None, generator=None):
    """
    The new token ids of each prompt (prompts: token-id lists of any lengths), in order. A row
    ends after it makes eos_id (kept in its list), after max_new_tokens, or when stop(new_ids)
    is true (called with the row's new ids after each token that did not already end it:
    eval.py checks its stop strings there). Tokens are chosen as `sampling` says (next_tokens),
    drawing from `generator`: one for all rows, or a list of one per prompt, and then a prompt's
    completion does not depend on which other prompts share its batch (grpo.py's rollouts).
    """
    new = [[] for _ in prompts]
    for row, token in _decode(model, prompts, max_new_tokens, sampling, generator, eos_id, stop):
        new[row].append(token)
    return new


def seeded_generator(key, device):
    """A random generator seeded by a tuple of integers alone, e.g. (seed, step, slot, sample): one
    completion's own noise for generate's list of generators, which no batching or rank split moves."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def stream(model, prompt, max_new_tokens, sampling=GREEDY, *, eos_id=None, generator=None):
    """Yield one prompt's new token ids one at a time, as they are made (sample.py)."""
    for _, token in _decode(model, [prompt], max_new_tokens, sampling, generator, eos_id, None):
        yield token


def check_max_new_tokens(max_new_tokens):
    """ValueError unless an integer >= 0 (sample.py checks before loading a model)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def check_prompts(args, prompts, max_new_tokens):
    """ValueError naming the first prompt the model cannot take (sample.py checks before echoing it)."""
    if not prompts or not all(isinstance(p, (list, tuple)) and p for p in prompts):
        raise ValueError("generate takes a non-empty list of prompts, each a non-empty list of token ids")
    for i, prompt in enumerate(prompts):
        if min(prompt) < 0 or max(prompt) >= args.vocab_size:
            bad = min(prompt) if min(prompt) < 0 else max(prompt)
            raise ValueError(f"prompt {i} has token id {bad}, outside the model's vocabulary of {args.vocab_size}")
        if args.sliding_window is None and len(prompt) + max_new_tokens > args.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"the model's context of {args.max_seq_len} tokens")


@torch.no_grad()
def _decode(model, prompts, max_new_tokens, sampling, generator, eos_id, stop):
    """Yield (row, token) as every unfinished row makes its next token. Finished rows leave the batch
    once at most half of it is still going: each time, the cache of the rows that remain is copied
    (KVCache.select), so all the leaving copies about one cache's worth, never one per finished row;
    until then a finished row costs its share of each step and its tokens are dropped."""
    check_max_new_tokens(max_new_tokens)
    check_prompts(model.args, prompts, max_new_tokens)
    if max_new_tokens == 0:
        return
    cache, h = _prefill(model, prompts, max_new_tokens)
    rows = list(range(len(prompts)))  # the prompt each batch row belongs to
    new, done = [[] for _ in prompts], [False] * len(prompts)
    while True:
        generators = [generator[r] for r in rows] if isinstance(generator, list) else generator
        tokens = next_tokens(model.logits(h), sampling, generators).tolist()
        for row, token in zip(rows, tokens):
            if not done[row]:
                new[row].append(token)
                yield row, token
                done[row] = token == eos_id or len(new[row]) == max_new_tokens or bool(stop and stop(new[row]))
        going = [i for i, row in enumerate(rows) if not done[row]]
        if not going:
            return
        if len(going) <= len(rows) // 2:
            cache = cache.select(going)
            rows, tokens = [rows[i] for i in going], [tokens[i] for i in going]
        h = model.hidden(torch.tensor(tokens, device=h.device)[:, None], cache)[:, -1]


def _prefill(model, prompts, max_new_tokens):
    """
    A cache holding every prompt, one row each, and each row's last hidden state [B, dim].
    The prefix that all prompts share (few-shot examples) is prefilled once, and so is each
    distinct prompt (GRPO samples one prompt group_size times); KVCache.select fans them out.

    Rows of different lengths: each distinct prompt is prefilled on its own, then the rows decode
    side by side, each at its own position (KVCache.pos), so no row holds padding. A row
    computes what it would alone; the one thing batching adds is the mask that hides the slots a
    shorter row has not filled yet (Transformer._mask).
    """
    weight = model.tok_embeddings.weight
    as_batch = lambda ids: torch.tensor([ids], dtype=torch.long, device=weight.device)
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    # every distinct prompt keeps at least its last token out of the prefix: its hidden state is needed
    shared = min(len(os.path.commonprefix(distinct)), min(map(len, distinct)) - 1)
    longest = max(map(len, distinct)) + max_new_tokens
    base = KVCache(model.args, 1, weight.device, weight.dtype, max_tokens=longest)
    if shared:
        model.hidden(as_batch(distinct[0][:shared]), base)
    cache = base.select([0] * len(distinct)) if len(distinct) > 1 else base
    last = []
    for b, prompt in enumerate(distinct):
        row = cache.row(b)
        last.append(model.hidden(as_batch(prompt[shared:]), row)[:, -1])
        cache.pos[b] = row.pos[0]
    row_of = {prompt: i for i, prompt in enumerate(distinct)}
    rows = [row_of[tuple(p)] for p in prompts]
    if rows == list(range(len(distinct))):
        return cache, torch.cat(last)
    return cache.select(rows), torch.cat(last)[rows]


def next_tokens(logits, sampling, generator=None):
    """One token id per row of logits [B, vocab], chosen as sampling (a Sampling) says, drawing from
    generator: one torch.Generator for all rows, or a list of one per row."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens ranked above it already cover top_p
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    if isinstance(generator, list):  # one per row: a row's draws do not depend on the other rows
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
