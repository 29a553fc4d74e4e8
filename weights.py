"""
Model weights in and out of files: this project's checkpoint (.pt), Hugging Face
Mistral/Llama directories (config.json + safetensors), and mistral-inference's consolidated
format. model.py is the network; this file only maps names, shapes and layouts onto it.

    load_model(path)              -> (Transformer in eval mode, tokenizer spec)
    save_checkpoint(path, model, tokenizer_spec)   one self-describing .pt file
    export_hf(model, out_dir)     an HF MistralForCausalLM directory
"""
import json
import os
import re
from dataclasses import asdict, fields

import torch

from model import ModelArgs, Transformer


class ModelLoadError(ValueError):
    pass


# our parameter name <-> HF Mistral/Llama name ({} = layer index)
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}


def _rename(name, table):
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():  # layer index: match the pattern with {} in its place
            pattern = ".".join(parts[:i] + ["{}"] + parts[i + 1:])
            return table[pattern].format(part) if pattern in table else None
    return table.get(name)


def _build(args, state_dict, device, dtype, source):
    with torch.device("meta"):
        model = Transformer(args)
    missing = set(model.state_dict()) - set(state_dict)
    unexpected = set(state_dict) - set(model.state_dict())
    if missing or unexpected:
        raise ModelLoadError(f"{source}: weights do not match the config "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    for name, p in model.state_dict().items():
        if state_dict[name].shape != p.shape:
            raise ModelLoadError(f"{source}: {name} has shape {tuple(state_dict[name].shape)}, "
                                 f"config expects {tuple(p.shape)}")
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


def _args_from_hf_config(cfg, source):
    # transformers reads model_type when a config names no architectures, and so do we
    arch = (cfg.get("architectures") or [{"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}.get(
        cfg.get("model_type"), cfg.get("model_type", "?"))])[0]
    if arch not in ("MistralForCausalLM", "LlamaForCausalLM"):
        raise ModelLoadError(f"{source}: unsupported architecture {arch} (MistralForCausalLM or LlamaForCausalLM)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelLoadError(f"{source}: rope scaling '{rope.get('rope_type', rope.get('type'))}' is not supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ModelLoadError(f"{source}: attention/MLP biases are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{source}: activation {cfg['hidden_act']} is not supported (silu)")
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        hidden_dim=cfg["intermediate_size"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        sliding_window=cfg.get("sliding_window"),  # absent (Llama) or null: full attention
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _load_hf_dir(path, device, dtype):
    from safetensors.torch import load_file

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ModelLoadError(f"{path}: not a model directory (no config.json)")
    with open(config_path) as f:
        cfg = json.load(f)
    try:
        args = _args_from_hf_config(cfg, config_path)
    except KeyError as e:
        raise ModelLoadError(f"{config_path}: missing field {e}") from None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state_dict = {}
    reverse = {hf: ours for ours, hf in HF_NAMES.items()}
    for file in files:
        try:
            tensors = load_file(os.path.join(path, file))
        except Exception as e:
            raise ModelLoadError(f"{path}/{file}: cannot read safetensors ({e})") from None
        for hf_name, tensor in tensors.items():
            ours = _rename(hf_name, reverse)
            if ours is None:
                if "rotary_emb" in hf_name:
                    continue  # some exports store RoPE tables; we compute them
                raise ModelLoadError(f"{path}/{file}: unexpected tensor {hf_name}")
            state_dict[ours] = tensor
    if args.tie_embeddings:
        state_dict.pop("output.weight", None)
    return _build(args, state_dict, device, dtype, path), path


def _load_consolidated(path, device, dtype):
    """mistral-inference's format: params.json + consolidated.safetensors, our parameter
    names, but RoPE on interleaved pairs (x0,x1),(x2,x3).. instead of (x_j, x_j+d/2)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "params.json")) as f:
        params = json.load(f)
    state_dict = load_file(os.path.join(path, "consolidated.safetensors"))
    known = {f.name for f in fields(ModelArgs)} - {"sliding_window", "tie_embeddings"}
    args = ModelArgs(**{k: v for k, v in params.items() if k in known},
                     sliding_window=params.get("sliding_window"),  # absent: full attention
                     tie_embeddings="output.weight" not in state_dict)

    def to_half_split(w, n_heads):
        # rows of one head are ordered (pair, 2); regroup them as (2, pair)
        return w.view(n_heads, args.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)

    for name, w in state_dict.items():
        if name.endswith("attention.wq.weight"):
            state_dict[name] = to_half_split(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            state_dict[name] = to_half_split(w, args.n_kv_heads)  # v is not rotated: unchanged
    return _build(args, state_dict, device, dtype, path), path


# what a model repository on the hub needs to hold for load_model (and its tokenizer)
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
             "tokenizer_config.json", "special_tokens_map.json"]


def is_hub_id(name):
    """Whether `name` means a model repository on the Hugging Face hub: 'owner/name' that is not
    a local path. A name ending in .pt is always a local checkpoint file of this project."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name or "")) and not name.endswith(".pt") and not os.path.exists(name)


def fetch_from_hub(repo_id):
    """The local directory of a hub model: its snapshot in the hub cache (~/.cache/huggingface, or
    HF_HUB_CACHE), downloaded first when it is not there (with progress bars). HF_HUB_OFFLINE=1
    uses the cache only."""
    from huggingface_hub import snapshot_download  # comes with datasets
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:  # offline and not cached, unknown or gated repository, no network
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"{repo_id}: no such local path, and the Hugging Face hub could not provide it "
                             f"({type(e).__name__}: {reason})") from None


def load_model(path, device="cpu", dtype=torch.float32):
    """Load a checkpoint file of this project, an HF Mistral/Llama directory, a Mistral
    consolidated directory, or an HF hub id ('owner/name', fetched into the hub cache).
    Returns (model in eval mode, tokenizer spec for tokenizer.Tokenizer.load)."""
    if is_hub_id(path):
        path = fetch_from_hub(path)
    if not path or not os.path.exists(path):
        raise ModelLoadError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "params.json")):
            return _load_consolidated(path, device, dtype)
        return _load_hf_dir(path, device, dtype)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: not a checkpoint file ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise ModelLoadError(f"{path}: not a checkpoint of this project (needs 'model_args' and 'model')")
    known = {f.name for f in fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in ckpt["model_args"].items() if k in known})
    return _build(args, ckpt["model"], device, dtype, path), ckpt.get("tokenizer", "mistral")


def save_checkpoint(path, model, tokenizer_spec, state_dict=None, **extra):
    """One self-describing file: model_args, weights, tokenizer spec, plus extra plain values.
    Written to a temporary name and renamed, so a crash never leaves a half-written file."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    state_dict = {k.replace("_orig_mod.", ""): v.detach().cpu() for k, v in state_dict.items()}
    ckpt = {"model_args": asdict(model.args), "model": state_dict, "tokenizer": tokenizer_spec, **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def export_hf(model, out_dir, state_dict=None, dtype=torch.bfloat16, max_shard_bytes=5 << 30,
              bos_id=1, eos_id=2):
    """Write an HF MistralForCausalLM directory (config.json + safetensors [+ index])
    that transformers.AutoModelForCausalLM.from_pretrained loads with the same logits.
    The tokenizer's files come from tokenizer.Tokenizer.save_hf."""
    from safetensors.torch import save_file

    a = model.args
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {}
    for name, t in state_dict.items():
        name = name.replace("_orig_mod.", "")
        tensors[_rename(name, HF_NAMES)] = t.detach().to("cpu", dtype).contiguous()
    os.makedirs(out_dir, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.numel() * t.element_size() > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * t.element_size()
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": a.dim,
        "num_hidden_layers": a.n_layers,
        "head_dim": a.head_dim,
        "intermediate_size": a.hidden_dim,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "vocab_size": a.vocab_size,
        "rms_norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta,
        "sliding_window": a.sliding_window,
        "max_position_embeddings": a.max_seq_len,
        "tie_word_embeddings": a.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
