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
    cos, sin = M.rope_cos_sin(pos, a.head_dim, a.rope_theta)
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


def test_rolling_slots():
    cache = M.KVCache(M.model_args("tiny"), 1, "cpu", torch.float32)  # 8 slots
    cache.pos = 11  # positions 3..10 are held; position p sits in slot p % 8
    assert cache.slot_positions().tolist() == [8, 9, 10, 3, 4, 5, 6, 7]
    cache.pos = 3
    assert cache.slot_positions().tolist() == [0, 1, 2, -1, -1, -1, -1, -1]


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
    ours = list(M.generate(model, prompt, 25))
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
