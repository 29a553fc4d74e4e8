"""sample.py end to end: greedy output on an HF directory equals transformers' generate."""
import importlib.resources
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
SPM = str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1")


def run_sample(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random-weight Mistral with the real 32k Mistral tokenizer and a window of 16."""
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                                     max_position_embeddings=512, attn_implementation="eager")
    model = transformers.MistralForCausalLM(cfg).eval()
    model.save_pretrained(path)
    shutil.copy(SPM, path / "tokenizer.model")
    return path, model


def test_greedy_matches_transformers_generate(hf_dir):
    path, hf = hf_dir
    prompt = "The rolling buffer cache keeps the last W keys, " * 3  # longer than the window of 16
    sp = sentencepiece.SentencePieceProcessor(model_file=SPM)
    ids = [sp.bos_id()] + sp.encode(prompt)
    assert len(ids) > 16
    out = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, eos_token_id=sp.eos_id(),
                      pad_token_id=0)[0, len(ids):].tolist()
    if out and out[-1] == sp.eos_id():
        out = out[:-1]
    expected = sp.decode(ids[1:] + out)[len(sp.decode(ids[1:])):]
    result = run_sample("--ckpt", str(path), "--prompt", prompt, "--max_new_tokens=30", "--temperature=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + expected + "\n"


def test_sampling_is_seeded(hf_dir):
    path, _ = hf_dir
    args = ("--ckpt", str(path), "--prompt", "Hello", "--max_new_tokens=12", "--temperature=1.0", "--top_p=0.9")
    first, second = run_sample(*args, "--seed=1"), run_sample(*args, "--seed=1")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "missing/final.pt"], "error: checkpoint not found: missing/final.pt"),
    (["--ckpt", "configurator.py"], "error: configurator.py: not a checkpoint file"),
    (["--ckpt"], "error: --ckpt needs a value"),
    (["--ckpt", ".", "--prompt=FILE:nope.txt"], "error: cannot read prompt file nope.txt"),
    (["--temprature=0"], "error: unknown config key '--temprature' (did you mean --temperature?)"),
    (["--max_new_tokens=ten"], "error: --max_new_tokens expects int"),
    (["--max_new_tokens=-5"], "error: max_new_tokens must be an integer >= 0, got -5"),
    (["--temperature=-1"], "error: temperature must be >= 0 (0 = greedy), got -1"),
    (["--top_k=-1"], "error: top_k must be an integer >= 0 (0 = off), got -1"),
    (["--top_p=0"], "error: top_p must be in (0, 1] (1 = off), got 0"),
    (["--top_p=1.5"], "error: top_p must be in (0, 1] (1 = off), got 1.5"),
])
def test_bad_input_is_one_line(args, message):
    result = run_sample(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_prompt_beyond_a_full_attention_context_is_one_line(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=None,
                                     max_position_embeddings=64)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path)
    shutil.copy(SPM, tmp_path / "tokenizer.model")
    result = run_sample("--ckpt", str(tmp_path), "--prompt", "one two three " * 10, "--max_new_tokens=40")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: prompt (32 tokens) + max_new_tokens (40) exceeds the model's context "
                                    "of 64 tokens\n"), result.stderr
