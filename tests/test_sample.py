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
])
def test_bad_input_is_one_line(args, message):
    result = run_sample(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
