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
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    """cos/sin tables [T, head_dim] for absolute positions, in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # half-split layout: pair (j, j + head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x [B, H, T, head_dim]: each pair (x_j, x_{j+d/2}) turns by its position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # keys are cached already rotated
        if cache is not None:
            k_all, v_all = cache.keys_values(layer, k, v)
        else:
            k_all, v_all = k, v
        # enable_gqa: each group of n_heads // n_kv_heads query heads reads the same key/value head.
        # No mask: causal without a cache; with one, a decode step whose keys are exactly its window
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, is_causal=mask is None and cache is None,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
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


def window_mask(q_pos, k_pos, window):
    """Boolean [Tq, Tk]: query at q_pos may read key at k_pos (k_pos < 0 marks an empty slot)."""
    q, k = q_pos[:, None], k_pos[None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window  # exactly `window` keys: q-W+1 .. q
    return allowed


class KVCache:
    """
    Rolling-buffer cache: `capacity` slots per layer, and the key/value of absolute
    position p lives in slot p % capacity. With capacity == sliding_window the
    buffer always holds every key a new token may read, so it can roll forever;
    a smaller buffer (max_tokens) or a model with full attention cannot roll, and
    overflowing it is an error.
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
        self.pos = 0  # tokens seen so far, the same for every row

    def slot_positions(self):
        """Absolute position held by each slot, -1 where the slot is still empty."""
        slots = torch.arange(self.capacity, device=self.k[0].device)
        newest = slots + self.capacity * torch.div(self.pos - 1 - slots, self.capacity, rounding_mode="floor")
        return torch.where(slots < self.pos, newest, -1)

    def keys_values(self, layer, k, v):
        """Store the new keys/values and return every key/value they may attend to.
        One new token (a decode step): it goes into its slot first, overwriting position pos - W,
        the one key that has just left the window; the filled slots are then exactly the keys it
        may read, in slot order (attention does not care about order: RoPE is already applied),
        so it needs no mask. Several (prefill): cached + new, to be masked by window_mask."""
        if k.shape[2] == 1:
            slot = self.pos % self.capacity
            self.k[layer][:, :, slot] = k[:, :, 0]
            self.v[layer][:, :, slot] = v[:, :, 0]
            n = min(self.pos + 1, self.capacity)
            return self.k[layer][:, :, :n], self.v[layer][:, :, :n]
        k_all = torch.cat([self.k[layer], k], dim=2)
        v_all = torch.cat([self.v[layer], v], dim=2)
        T = k.shape[2]
        keep = min(T, self.capacity)  # only the newest `capacity` tokens can be read later
        slots = (self.pos + torch.arange(T - keep, T, device=k.device)) % self.capacity
        self.k[layer].index_copy_(2, slots, k[:, :, T - keep:])
        self.v[layer].index_copy_(2, slots, v[:, :, T - keep:])
        return k_all, v_all

    def select(self, rows):
        """A new cache whose row i is a copy of row rows[i]: one prefix, several continuations."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.k[0].device)
        new = object.__new__(KVCache)
        new.__dict__.update(self.__dict__)
        new.k = [t.index_select(0, index) for t in self.k]
        new.v = [t.index_select(0, index) for t in self.v]
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

    def hidden(self, idx, cache=None):
        """Final-norm hidden states [B, T, dim]. With a cache, positions continue from cache.pos."""
        x = self.tok_embeddings(idx)
        if cache is None:
            return self.norm(self._run_layers(x, 0, None))
        if not cache.rolls and cache.pos + idx.shape[1] > cache.capacity:
            raise ValueError(f"KV cache full: {cache.pos} + {idx.shape[1]} tokens exceed its {cache.capacity} slots")
        # prefill in chunks of at most `capacity` tokens, so attention memory stays bounded
        outs = []
        for chunk in x.split(cache.capacity, dim=1):
            outs.append(self._run_layers(chunk, cache.pos, cache))
            cache.pos += chunk.shape[1]
        return self.norm(torch.cat(outs, dim=1))

    def _run_layers(self, x, start, cache):
        T = x.shape[1]
        q_pos = torch.arange(start, start + T, device=x.device)
        cos, sin = rope_cos_sin(q_pos, self.args.head_dim, self.args.rope_theta)
        W = self.args.sliding_window
        if cache is not None and T == 1:
            mask = None  # a decode step reads every filled slot (KVCache.keys_values)
        elif cache is not None:
            mask = window_mask(q_pos, torch.cat([cache.slot_positions(), q_pos]), W)
        elif W is None or T <= W:
            mask = None  # plain causal: the window never bites (phases 1 and 2 train this way)
        else:
            mask = window_mask(q_pos, q_pos, W)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos.to(x.dtype), sin.to(x.dtype), mask, cache, i)
        return x

    def logits(self, h):
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, weight).float()

    def forward(self, idx, targets=None, cache=None):
        logits = self.logits(self.hidden(idx, cache))
        loss = None
        if targets is not None:
            # reshape: targets are often a shifted (non-contiguous) view of the batch
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


# ----------------------------------------------------------------------------- generation

def generate(model, prompts, max_new_tokens, *args, temperature=0.0, top_k=0, top_p=1.0, eos_id=None, stop=None,
             generator=None, **kwargs):
    """SHIM until the batched generate lands: prompts is a list of token-id lists -> one list of new
    ids per prompt (ends after eos_id, when stop(new_ids) is True, or at max_new_tokens), one prompt
    at a time. A single prompt (a list of ints) keeps the old streaming behaviour."""
    if not prompts or isinstance(prompts[0], int):
        return _generate_one(model, prompts, max_new_tokens, *args, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_id=eos_id, generator=generator, **kwargs)
    out = []
    for prompt in prompts:
        new = []
        for token in _generate_one(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   eos_id=eos_id, generator=generator):
            new.append(token)
            if stop is not None and stop(new):
                break
        out.append(new)
    return out


@torch.no_grad()
def _generate_one(model, prompt, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, eos_id=None, generator=None):
    """
    Yield new token ids one at a time. The prompt is prefilled through the rolling
    cache (in chunks of at most W tokens), then each step feeds one token.
    temperature 0 is greedy. Stops after yielding eos_id.
    """
    weight = model.tok_embeddings.weight
    args = model.args
    total = len(prompt) + max_new_tokens
    if args.sliding_window is None and total > args.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {args.max_seq_len} tokens")
    if weight.device.type == "cpu":
        _column_major_head(model)
    cache = KVCache(args, 1, weight.device, weight.dtype, max_tokens=total)
    idx = torch.tensor([prompt], dtype=torch.long, device=weight.device)
    for _ in range(max_new_tokens):
        logits = model.logits(model.hidden(idx, cache)[:, -1])
        token = sample_next(logits, temperature, top_k, top_p, generator)
        yield token.item()
        if token.item() == eos_id:
            return
        idx = token[:, None]


def _column_major_head(model):
    """Store the output head [vocab, dim] column-major (same shape and values, transposed strides).
    A decode step multiplies one row by this tall, narrow matrix, and CPU BLAS does that 1.5-3x
    faster in column-major order: 4.9 -> 1.7 ms for 32000 x 256 on a 2-core EPYC, 7.6 -> 3.8 ms
    for 32000 x 512, 31 -> 28 ms for 32000 x 4096. For a small model the head is most of the
    weights a step reads. Batched matmuls (training, prefill, eval) run as fast either way."""
    head = model.tok_embeddings if model.output is None else model.output
    w = head.weight
    if w.dim() == 2 and w.stride() == (w.shape[1], 1) and w.shape[0] > w.shape[1]:
        w.data = w.data.t().contiguous().t()


def sample_next(logits, temperature, top_k, top_p, generator=None):
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens ranked above it already cover top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
