"""model.py against independent truths: HF transformers' Mistral/Llama, a written-out
attention reference, and the cached-decode == full-forward invariant."""
import json
import math

import pytest
import torch

import model as M
import weights as W

transformers = pytest.importorskip("transformers")


def hf_mistral(tmp_path, **overrides):
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
               max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-5)
    cfg.update(overrides)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg, attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path)
    return hf


def reference_forward(model, idx):
    """The network written out with explicit softmax(QK^T/sqrt(d) + mask) V, no SDPA, no cache."""
    a = model.args
    T = idx.shape[1]
    pos = torch.arange(T)
    cos, sin = M.rope_cos_sin(pos[None], a.head_dim, a.rope_theta)
    i, j = pos[:, None], pos[None, :]
    allowed = (j <= i) & ((j > i - a.sliding_window) if a.sliding_window else True)
    x = model.tok_embeddings(idx)
    for layer in model.layers:
        att = layer.attention
        h = layer.attention_norm(x)
        B = h.shape[0]
        q = att.wq(h).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = att.wk(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = att.wv(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = M.apply_rope(q, cos, sin), M.apply_rope(k, cos, sin)
        group = a.n_heads // a.n_kv_heads
        k = torch.stack([k[:, hd // group] for hd in range(a.n_heads)], 1)  # head hd reads kv head hd//group
        v = torch.stack([v[:, hd // group] for hd in range(a.n_heads)], 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + att.wo(y)
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return model.logits(model.norm(x))


def tiny(**overrides):
    torch.manual_seed(0)
    m = M.Transformer(M.model_args("tiny", **overrides))
    m.init_weights()
    return m.eval()


@pytest.mark.concept
@torch.no_grad()
def test_matches_hf_mistral_with_sliding_window(tmp_path):
    hf = hf_mistral(tmp_path)
    model, spec = W.load_model(str(tmp_path))
    assert model.args.sliding_window == 8 and model.args.rope_theta == 5000.0
    idx = torch.randint(0, 300, (2, 40))  # 5x the window: the band matters
    diff = (model(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


@torch.no_grad()
def test_matches_hf_llama_with_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   tie_word_embeddings=True, rope_theta=500000.0, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model, _ = W.load_model(str(tmp_path))
    assert model.output is None and model.args.sliding_window is None
    idx = torch.randint(0, 300, (2, 33))
    diff = (model(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.concept
@torch.no_grad()
@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_heads=4), dict(sliding_window=None)])
def test_fast_path_matches_written_out_attention(overrides):
    model = tiny(**overrides)
    for T in (5, 8, 30):  # shorter than, equal to and longer than the window
        idx = torch.randint(0, 256, (2, T))
        diff = (model(idx)[0] - reference_forward(model, idx)).abs().max().item()
        assert diff < 1e-5, (overrides, T, diff)


@torch.no_grad()
def test_mha_when_kv_heads_equal_heads():
    """n_kv_heads == n_heads is plain multi-head attention: compare with torch's own MHA."""
    model = tiny(n_kv_heads=4, n_layers=1, sliding_window=None)
    att, a = model.layers[0].attention, model.args
    mha = torch.nn.MultiheadAttention(a.dim, a.n_heads, bias=False, batch_first=True)
    mha.in_proj_weight.copy_(torch.cat([att.wq.weight, att.wk.weight, att.wv.weight]))
    mha.out_proj.weight.copy_(att.wo.weight)
    T = 12
    x = torch.randn(2, T, a.dim)
    # zero rotation (position 0 everywhere) isolates the attention arithmetic from RoPE
    cos, sin = torch.ones(T, a.head_dim), torch.zeros(T, a.head_dim)
    ours = att(x, cos, sin, None)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    theirs = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.concept
@torch.no_grad()
def test_cached_decode_equals_full_forward():
    model = tiny()  # W = 8
    W = model.args.sliding_window
    idx = torch.randint(0, 256, (2, 4 * W + 3))
    full = model(idx)[0]
    cache = M.KVCache(model.args, 2, "cpu", torch.float32)
    prompt = 2 * W + 5  # prefilled in chunks of at most W
    pieces = [model(idx[:, :prompt], cache=cache)[0]]
    for t in range(prompt, idx.shape[1]):
        pieces.append(model(idx[:, t:t + 1], cache=cache)[0])
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-5
    assert cache.capacity == W and cache.k[0].shape[2] == W  # memory stops growing at W


@torch.no_grad()
def test_cache_expand_shares_a_prefix():
    model = tiny()
    prefix, conts = torch.randint(0, 256, (1, 11)), torch.randint(0, 256, (3, 4))
    cache = M.KVCache(model.args, 1, "cpu", torch.float32)
    model(prefix, cache=cache)
    out = model(conts, cache=cache.select([0, 0, 0]))[0]
    full = model(torch.cat([prefix.expand(3, -1), conts], 1))[0][:, 11:]
    assert (out - full).abs().max().item() < 1e-5


def test_cache_overflow_names_the_row():
    """A cache that cannot roll (full attention) names the row that would overflow it, counting
    each row's own tokens when rows are ragged (add's lengths)."""
    cache = M.KVCache(M.model_args("tiny", sliding_window=None), 2, "cpu", torch.float32, max_tokens=10)
    cache.add(8, [8, 3])
    assert cache.pos == [8, 3]
    with pytest.raises(ValueError, match="row 0 holds 8 tokens, and 3 more exceed its 10 slots"):
        cache.add(3, [3, 1])


@pytest.mark.concept
def test_rolling_slots():
    cache = M.KVCache(M.model_args("tiny"), 1, "cpu", torch.float32)  # 8 slots
    # after 11 tokens positions 3..10 are held, position p in slot p % 8; after 3, slots 0..2
    assert cache.slot_positions([11, 3]).tolist() == [[8, 9, 10, 3, 4, 5, 6, 7], [0, 1, 2, -1, -1, -1, -1, -1]]


def test_meta_device_moxin_7b_parameter_count():
    with torch.device("meta"):
        model = M.Transformer(M.model_args("moxin-7b"))
    assert model.num_params() == 8_114_180_096
    with torch.device("meta"):
        assert M.Transformer(M.model_args("mistral-7b")).num_params() == 7_241_732_096


@torch.no_grad()
def test_greedy_generate_matches_hf(tmp_path):
    hf = hf_mistral(tmp_path)
    model, _ = W.load_model(str(tmp_path))
    prompt = torch.randint(3, 300, (19,)).tolist()  # longer than the window of 8
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=25, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours = M.generate(model, [prompt], 25)[0]
    assert ours == expected


@torch.no_grad()
def test_export_hf_roundtrip(tmp_path):
    model = tiny()
    W.export_hf(model, tmp_path / "hf", dtype=torch.float32, max_shard_bytes=40_000)  # force several shards
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    idx = torch.randint(0, 256, (2, 30))
    assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
    again, _ = W.load_model(str(tmp_path / "hf"))  # and back through our sharded loader
    assert (again(idx)[0] - model(idx)[0]).abs().max().item() == 0


@pytest.mark.concept
@torch.no_grad()
def test_consolidated_interleaved_rope(tmp_path):
    """Mistral's original format stores q/k rows as interleaved RoPE pairs."""
    from safetensors.torch import save_file

    hf = hf_mistral(tmp_path / "hf")
    model, _ = W.load_model(str(tmp_path / "hf"))
    a = model.args

    def to_interleaved(w, n):  # inverse of the load-time permutation, written independently
        d = a.head_dim
        w = w.view(n, 2, d // 2, -1)
        return torch.stack([w[:, 0], w[:, 1]], dim=2).reshape(n * d, -1)

    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("wq.weight"):
            v = to_interleaved(v, a.n_heads)
        elif k.endswith("wk.weight"):
            v = to_interleaved(v, a.n_kv_heads)
        sd[k] = v.contiguous()
    out = tmp_path / "consolidated"
    out.mkdir()
    save_file(sd, out / "consolidated.safetensors")
    params = dict(dim=a.dim, n_layers=a.n_layers, head_dim=a.head_dim, hidden_dim=a.hidden_dim, n_heads=a.n_heads,
                  n_kv_heads=a.n_kv_heads, norm_eps=a.norm_eps, vocab_size=a.vocab_size, rope_theta=a.rope_theta,
                  sliding_window=a.sliding_window)
    (out / "params.json").write_text(json.dumps(params))
    loaded, _ = W.load_model(str(out))
    idx = torch.randint(0, 300, (1, 20))
    assert (loaded(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_checkpoint_roundtrip_weights_only(tmp_path):
    model = tiny()
    path = tmp_path / "ckpt.pt"
    W.save_checkpoint(str(path), model, "mistral", step=7)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 7 and ckpt["tokenizer"] == "mistral"
    loaded, spec = W.load_model(str(path))
    idx = torch.randint(0, 256, (1, 9))
    assert torch.equal(loaded(idx)[0], model(idx)[0]) and spec == "mistral"


def test_bad_inputs(tmp_path):
    with pytest.raises(W.ModelLoadError, match="not found"):
        W.load_model(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(W.ModelLoadError, match="not a checkpoint"):
        W.load_model(str(junk))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(W.ModelLoadError, match="not a checkpoint of this project"):
        W.load_model(str(tmp_path / "other.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(W.ModelLoadError, match="no config.json"):
        W.load_model(str(tmp_path / "empty"))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(W.ModelLoadError, match="unsupported architecture GPT2LMHeadModel"):
        W.load_model(str(gpt2))
    with pytest.raises(ValueError, match="unknown model preset"):
        M.model_args("moxin-70b")


# ----------------------------------------------------------------------------- attention kernels

def written_out_attention(q, k, v, allowed):
    group = q.shape[1] // k.shape[1]
    k, v = k[:, torch.arange(q.shape[1]) // group], v[:, torch.arange(q.shape[1]) // group]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.concept
@torch.no_grad()
def test_masked_attention_with_expanded_heads():
    """With a mask, CUDA runs attend on k/v expanded to every query head (repeat_kv), so that a
    fused kernel takes the mask; both that and the grouped path equal the written-out attention."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 16), torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 16)
    q_pos = torch.tensor([[6, 7, 8, 9, 10], [2, 3, 4, 5, 6]])
    k_pos = torch.tensor([list(range(11)), [0, 1, 2, 3, 4, 5, 6, -1, -1, -1, -1]])  # row 1: empty slots
    mask = M.window_mask(q_pos, k_pos, 4)
    expected = written_out_attention(q, k, v, mask)
    assert (M.attend(q, k, v, mask) - expected).abs().max() < 1e-5
    assert (M.attend(q, *M.repeat_kv(k, v, 2), mask) - expected).abs().max() < 1e-5


@torch.no_grad()
def test_a_decode_step_reads_each_key_value_head_once():
    """One new token per row: the query heads of a group are attended as rows of their key/value
    head (no copy per query head), with and without a mask; equal to the written-out attention."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    readable = torch.rand(3, 1, 1, 11) > 0.3
    readable[..., 0] = True
    for mask in (None, readable):
        expected = written_out_attention(q, k, v, torch.ones(3, 1, 1, 11, dtype=torch.bool) if mask is None else mask)
        assert (M.attend(q, k, v, mask) - expected).abs().max() < 1e-5


def test_token_logprobs_at_the_targets_equal_the_full_logits():
    """Transformer.token_logprobs runs the head at target positions alone: the same log-probs (and
    gradient) as a log-softmax over every position's logits."""
    model = tiny()
    x = torch.randint(0, 256, (3, 10))
    y = torch.randint(0, 256, (3, 10)).masked_fill(torch.rand(3, 10) < 0.5, -1)
    got = model.token_logprobs(x, y)
    logits, _ = model(x)
    full = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0].masked_fill(y == -1, 0)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(lp.sum(), model.layers[0].attention.wq.weight)[0] for lp in (got, full)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_the_window_as_blocks_equals_the_written_out_attention():
    """Past W tokens on CUDA, attention takes the band as FlexAttention's block mask (window_blocks)
    instead of a [T, T] mask; here run on the CPU (eager FlexAttention) against the written-out
    attention, with grouped heads and a sequence over several blocks of 128."""
    torch.manual_seed(0)
    T, W = 300, 100
    q, k, v = torch.randn(2, 4, T, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    pos = torch.arange(T)[None].expand(2, -1)
    expected = written_out_attention(q, k, v, M.window_mask(pos, pos, W))
    assert (M.attend(q, k, v, M.window_blocks(T, W, torch.device("cpu"))) - expected).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_a_sequence_past_the_window_on_cuda_equals_the_dense_mask():
    model = tiny().cuda()
    x = torch.randint(0, 256, (2, 40), device="cuda")  # window 8: the band as blocks on CUDA
    assert isinstance(model._mask(torch.arange(40, device="cuda")[None], None, None), M.BlockMask)
    logits, _ = model(x)
    dense = M.Transformer.forward(model.cpu(), x.cpu())[0]
    assert (logits.cpu() - dense).abs().max() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_masked_attention_runs_a_fused_kernel_on_cuda():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 8, 64, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.arange(64, device="cuda").expand(2, -1)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # raises if no fused kernel takes the call
        M.attend(q, k, v, M.window_mask(pos, pos, 16))


# ----------------------------------------------------------------------------- batched generation

def alone(model, prompts, n, **kw):
    return [M.generate(model, [p], n, **kw)[0] for p in prompts]


def prompts_of(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.concept
@torch.no_grad()
@pytest.mark.parametrize("window", [8, None])
def test_batched_greedy_equals_each_prompt_alone(window):
    """Different lengths, the window (8) crossed by prompt and by generation; full attention too."""
    model = tiny(sliding_window=window)
    prompts = prompts_of([3, 7, 13, 20, 1])
    assert M.generate(model, prompts, 12) == alone(model, prompts, 12)


@torch.no_grad()
def test_batched_greedy_with_a_shared_prefix(monkeypatch):
    model = tiny()
    prefix = torch.randint(3, 256, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = prompts_of([1, 4, 9], prefix=prefix) + [prefix]
    expected = alone(model, prompts, 10)
    fed = []  # tokens prefilled: the prefix once, then what each prompt adds
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda idx, cache=None: fed.append(idx.shape) or hidden(idx, cache))
    assert M.generate(model, prompts, 10) == expected
    assert fed[:5] == [(1, 10), (1, 2), (1, 5), (1, 10), (1, 1)]  # prefix 10 = 11 - 1: prompt 3 keeps its last
    assert fed[5] == (4, 1)  # then every row decodes together


@torch.no_grad()
def test_identical_prompts_are_prefilled_once(monkeypatch):
    model = tiny()
    p, q = prompts_of([6, 9])
    expected = alone(model, [p, q], 8)
    fed = []
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda idx, cache=None: fed.append(idx.shape) or hidden(idx, cache))
    assert M.generate(model, [p, q, p, p], 8) == [expected[0], expected[1], expected[0], expected[0]]
    # each distinct prompt once (they share no prefix), then 7 decode steps of all 4 rows: 8 new tokens
    assert fed == [(1, len(p)), (1, len(q))] + [(4, 1)] * 7


@torch.no_grad()
def test_eos_and_stop_end_rows_and_finished_rows_leave_the_batch(monkeypatch):
    model = tiny(sliding_window=None)
    prompts = prompts_of([5, 8, 2])
    full = alone(model, prompts, 10)
    eos = full[0][3]
    upto = lambda ids, t: ids[:ids.index(t) + 1] if t in ids else ids
    calls = []

    def stop(ids):  # row 1 stops once it has made its 6th token, whatever it is
        calls.append(list(ids))
        return ids[:6] == full[1][:6] and len(ids) == 6

    sizes = []
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda idx, cache=None: sizes.append(idx.shape[0]) or hidden(idx, cache))
    got = M.generate(model, prompts, 10, eos_id=eos, stop=stop)
    expected = [upto(r, eos) for r in full]
    expected[1] = expected[1][:6]
    assert got == expected and got[0][-1] == eos
    # stop sees each row's ids after every token that did not already end the row (EOS, the limit)
    assert sorted(calls) == sorted(g[:n] for g in got for n in range(1, len(g) + (g[-1] != eos and len(g) < 10)))
    # finished rows leave once at most half the batch is still going
    assert sizes[3:] == sorted(sizes[3:], reverse=True) and sizes[-1] == 1


@torch.no_grad()
def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny()
    prompts = prompts_of([4, 9, 4])
    draw = lambda seed, **kw: M.generate(model, prompts, 10, M.Sampling(1.0, **kw),
                                         generator=torch.Generator().manual_seed(seed))
    assert draw(3) == draw(3) and draw(3) != draw(4)
    assert draw(3, top_p=0.5) == draw(3, top_p=0.5)
    assert draw(5, top_k=1) == M.generate(model, prompts, 10)


@torch.no_grad()
def test_stream_yields_what_generate_returns():
    model = tiny()
    prompt = prompts_of([13])[0]
    assert list(M.stream(model, prompt, 12)) == M.generate(model, [prompt], 12)[0]
    g = lambda: torch.Generator().manual_seed(0)
    assert list(M.stream(model, prompt, 12, M.Sampling(0.7, top_k=20), generator=g())) == \
        M.generate(model, [prompt], 12, M.Sampling(0.7, top_k=20), generator=g())[0]


@torch.no_grad()
def test_generate_leaves_the_model_as_it_was():
    model = tiny()
    before = {n: (p.data_ptr(), p.stride(), p.clone()) for n, p in model.state_dict().items()}
    M.generate(model, prompts_of([5, 12]), 6)
    M.generate(model, prompts_of([5, 12]), 6, M.Sampling(1.0, top_p=0.9))
    for n, p in model.state_dict().items():
        assert (p.data_ptr(), p.stride()) == before[n][:2] and torch.equal(p, before[n][2]), n


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.0), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_sampling_settings_out_of_range(settings, message):
    with pytest.raises(ValueError, match=message):
        M.Sampling(**settings)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-5), "max_new_tokens must be an integer >= 0, got -5"),
    (dict(prompts=[[1, 2], []]), "each a non-empty list of token ids"),
    (dict(prompts=[[1, 256]]), "prompt 0 has token id 256, outside the model's vocabulary of 256"),
    (dict(prompts=[[1] * 100], max_new_tokens=29), r"prompt \(100 tokens\) \+ max_new_tokens \(29\) exceeds "
                                                   "the model's context of 128 tokens"),
])
def test_generate_bad_arguments(kwargs, message):
    model = tiny(sliding_window=None)
    kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        M.generate(model, kwargs["prompts"], kwargs["max_new_tokens"])
    assert M.generate(model, [[1] * 100], 28)[0] and M.generate(model, [[1, 2]], 0) == [[]]
