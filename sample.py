"""
Generate text from a checkpoint of this project or an HF Mistral/Llama directory.

    python sample.py --ckpt out/final.pt --prompt "def fibonacci(n):"
    python sample.py --ckpt path/to/hf_model --prompt FILE:prompt.txt --temperature=0
    python sample.py --ckpt out/sft/final.pt --chat            # multi-turn chat in the terminal

Tokens stream to stdout as they are produced; generation stops at EOS. Prompts
longer than the sliding window are fine: the rolling KV cache prefills them in
chunks and decodes with memory that stops growing at W tokens.
"""
import sys
import time

import torch

from configurator import configure, settings
from model import Sampling, check_max_new_tokens, check_prompts, stream
from tokenizer import Tokenizer, encode_chat
from weights import ModelLoadError, load_model

# ---------------------------------------------------------------- settings
ckpt = "out/final.pt"  # a .pt file written by pretrain.py / sft.py, an HF model directory, or an HF hub id
prompt = ""  # text, or FILE:path to read it from a file; "" starts from BOS alone
max_new_tokens = 200
temperature = 0.8  # 0 = greedy
top_k = 200  # 0 = off
top_p = 1.0  # 1.0 = off
seed = 1337
num_samples = 1
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "auto"  # float32 on CPU (no fast bf16 there), bfloat16 on CUDA
chat = False  # Moxin's chat template; one turn with --prompt, else an interactive conversation
system = ""  # chat: an optional system message
config_keys = settings(globals())


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def show(tokens, tokenizer, context):
    """Print tokens as text while they arrive; return the ids. Each step decodes
    context + new ids and prints what was added: SentencePiece drops the space of a
    sequence's first piece, and a multi-byte character can span several tokens."""
    ids, start = [], len(tokenizer.decode(context))
    shown = 0
    for token in tokens:
        if token == tokenizer.eos_id:
            break
        ids.append(token)
        text = tokenizer.decode(context + ids)[start:]
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[shown:], end="", flush=True)
            shown = len(text)
    print(tokenizer.decode(context + ids)[start:][shown:], flush=True)
    return ids


def read_prompt(prompt):
    """The prompt's text: as given, or the contents of FILE:path."""
    if not prompt.startswith("FILE:"):
        return prompt
    try:
        with open(prompt[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        fail(f"cannot read prompt file {prompt[5:]}: {e.strerror}")


def load(ckpt, device, dtype):
    """(model, tokenizer) from a checkpoint or HF directory, or a one-line error."""
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"--dtype must be float32, bfloat16 or float16, got {dtype}")
    try:
        model, tokenizer_spec = load_model(ckpt, device=device, dtype=getattr(torch, dtype))
        tokenizer = Tokenizer.load(tokenizer_spec)
    except (ModelLoadError, ValueError) as e:
        fail(str(e))
    if tokenizer.vocab_size > model.args.vocab_size:
        fail(f"tokenizer {tokenizer.spec} has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}")
    return model, tokenizer


def chat_loop(complete, tokenizer, prompt, system):
    """Each turn re-encodes the whole conversation in the template sft.py trains on; with a prompt,
    one turn, else a conversation typed in the terminal."""
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        if prompt:
            user = prompt
        else:
            try:
                user = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
        messages.append({"role": "user", "content": user})
        ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
        reply = complete(ids)
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
        if prompt:
            return


def main():
    configure(globals(), config_keys)
    try:
        check_max_new_tokens(max_new_tokens)
        sampling = Sampling(temperature, top_k, top_p)
    except ValueError as e:
        fail(str(e))
    text = read_prompt(prompt)
    model, tokenizer = load(ckpt, device, dtype)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)

    def complete(ids):
        try:
            return show(stream(model, ids, max_new_tokens, sampling, eos_id=tokenizer.eos_id, generator=generator),
                        tokenizer, ids)
        except ValueError as e:  # e.g. a prompt longer than a full-attention model's context
            fail(str(e))

    if chat:
        return chat_loop(complete, tokenizer, text, system)
    ids = tokenizer.encode(text, add_special_tokens=True)
    if not ids:  # a tokenizer that adds no BOS, with an empty prompt: start from its end-of-text token
        ids = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    try:
        check_prompts(model.args, [ids], max_new_tokens)  # before the prompt is echoed
    except ValueError as e:
        fail(str(e))
    for _ in range(num_samples):
        t0 = time.time()
        print(text, end="", flush=True)
        new = complete(ids)
        dt = time.time() - t0
        print(f"---------- {len(new)} tokens in {dt:.1f}s ({len(new) / max(dt, 1e-9):.1f} tok/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
