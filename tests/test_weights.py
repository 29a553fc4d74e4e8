"""weights.py beyond the HF parity tests of test_model.py: configs that name only a model_type,
and HF hub ids resolved through a hub cache the test fills itself (HF_HUB_OFFLINE=1)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import weights as W  # noqa: E402
from model import Transformer, model_args  # noqa: E402
from training_runs import ENV, ROOT  # noqa: E402


def tiny_hf_dir(path, vocab_size=256, **config_changes):
    torch.manual_seed(0)
    model = Transformer(model_args('tiny', vocab_size=vocab_size))
    model.init_weights()
    W.export_hf(model, str(path), dtype=torch.float32)
    config = json.loads((path / 'config.json').read_text())
    config.update(config_changes)
    (path / 'config.json').write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return model


@pytest.mark.parametrize('model_type', ['mistral', 'llama'])
def test_config_with_model_type_and_no_architectures_loads(tmp_path, model_type):
    import transformers
    original = tiny_hf_dir(tmp_path, architectures=None, model_type=model_type)
    model, _ = W.load_model(str(tmp_path))
    idx = torch.tensor([[1, 5, 9, 200, 3]])
    torch.testing.assert_close(model(idx)[0], original(idx)[0])
    # transformers reads the same directory as the same kind of model
    assert transformers.AutoConfig.from_pretrained(str(tmp_path)).model_type == model_type
    (tmp_path / 'config.json').write_text(json.dumps({**json.loads((tmp_path / 'config.json').read_text()),
                                                      'model_type': 'gpt2'}))
    with pytest.raises(W.ModelLoadError, match='unsupported architecture gpt2'):
        W.load_model(str(tmp_path))


def test_hub_ids_are_told_apart_from_paths(tmp_path):
    assert W.is_hub_id('moxin-org/moxin-llm-7b')
    assert not W.is_hub_id('out/final.pt')  # our checkpoint files are always local
    assert not W.is_hub_id('no/such/model')  # two slashes: a path
    assert not W.is_hub_id(str(tmp_path))  # exists locally
    assert not W.is_hub_id('')


def fill_hub_cache(cache, repo_id, source_dir):
    """The hub cache's own layout (huggingface_hub): models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = 'a' * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for f in source_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return snapshot


def test_hub_id_loads_from_the_cache_offline_and_an_unknown_one_is_one_line(tmp_path):
    source = tmp_path / 'source'
    source.mkdir()
    original = tiny_hf_dir(source, vocab_size=32000)  # Mistral's tokenizer goes with it
    from tokenizer import Tokenizer
    Tokenizer.load('mistral').save_hf(str(source))
    cache = tmp_path / 'hub'
    fill_hub_cache(cache, 'someone/tiny-mistral', source)
    env = {**ENV, 'HF_HUB_CACHE': str(cache), 'HF_HUB_OFFLINE': '1'}
    # the weights that come back through the hub id are the ones put in the cache
    saved = tmp_path / 'loaded.pt'
    code = f"import torch, weights; m, spec = weights.load_model('someone/tiny-mistral'); torch.save(m.state_dict(), {str(saved)!r}); print(spec)"
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(str(cache))  # the tokenizer is read from the snapshot too
    loaded = torch.load(saved, weights_only=True)
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    # as a user runs it
    p = subprocess.run([sys.executable, 'sample.py', '--ckpt=someone/tiny-mistral', '--prompt=ab',
                        '--temperature=0', '--max_new_tokens=6'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith('ab'), p.stderr
    p = subprocess.run([sys.executable, 'sample.py', '--ckpt=someone/not-there', '--prompt=ab'],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: someone/not-there: no such local path'), p.stderr
