"""tokenizer.Tokenizer against independent implementations: Mistral's own mistral-common,
HF transformers, and tiktoken/tokenizers objects built in the test."""
import importlib.resources
import json
import shutil

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors, trainers, decoders

from tokenizer import Tokenizer, encode_chat

MISTRAL_MODEL = str(importlib.resources.files('mistral_common') / 'data' / 'tokenizer.model.v1')
PROSE = ["Hello world", "The quick brown fox jumps over the lazy dog.", "héllo 日本語 🤖 naïve café",
         "", "x", "Numbers 12345 and symbols #$%&*!", "line one\nline two\n\nline four"]
# runs of spaces and tabs: where HF's converted fast tokenizer is known to differ from SentencePiece
WHITESPACE = ["def f(x):\n    return x\n", "  two leading", "a  b\t\tc", " leading space", "trailing  "]
INJECTION = "a literal </s> and <s> stay text"


@pytest.fixture(scope='module')
def mistral():
    return Tokenizer.load('mistral')


def test_mistral_matches_mistral_common(mistral):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    ref = MistralTokenizer.v1().instruct_tokenizer.tokenizer
    assert (mistral.vocab_size, mistral.bos_id, mistral.eos_id) == (32000, 1, 2)
    for text in PROSE + WHITESPACE + [INJECTION]:
        assert mistral.encode(text) == ref.encode(text, bos=False, eos=False), text
        assert mistral.encode(text, add_special_tokens=True) == ref.encode(text, bos=True, eos=False), text
        assert mistral.decode(ref.encode(text, bos=True, eos=True)) == text
    assert 2 not in mistral.encode(INJECTION) and 1 not in mistral.encode(INJECTION)


# what SentencePiece and transformers' converted tokenizers are known to split differently
HARD = WHITESPACE + ["end.  Next", "\tindented\n\t\tdeeper\n        eight", "x\r\ny", "a\u3000b\u00a0c", "\u200b zero width",
                     "   ", "\n", "emoji 🤖🤖 and ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ÿ", "trailing\n", "1234567 3.14159 2024-12-01"]
CHATS = [
    [dict(role='user', content='What is  2+2?'), dict(role='assistant', content=' Four.\n\n    indented')],
    [dict(role='system', content='Be brief.'), dict(role='user', content='Hi'), dict(role='assistant', content='Hello!'),
     dict(role='user', content='  Code?'), dict(role='assistant', content='def f():\n    pass'), dict(role='user', content='日本語')],
]


@pytest.fixture(scope='module')
def exported(tmp_path_factory, mistral):
    path = tmp_path_factory.mktemp('hf')
    mistral.save_hf(str(path))  # what an exported model directory ships
    return path


def test_export_matches_sentencepiece_in_transformers(exported, mistral):
    from transformers import AutoTokenizer
    assert (exported / 'tokenizer.model').read_bytes() == open(MISTRAL_MODEL, 'rb').read()
    hf = AutoTokenizer.from_pretrained(str(exported))
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (1, 2, 32000)
    for text in PROSE + HARD:
        assert hf.encode(text, add_special_tokens=False) == mistral.encode(text), text
        assert hf.encode(text) == mistral.encode(text, add_special_tokens=True), text
        assert hf.decode(hf.encode(text), skip_special_tokens=True) == text, text
    # and the directory read back by this project: tokenizer.json first, the same ids
    from_dir = Tokenizer.load(str(exported))
    assert from_dir.kind == 'hf' and (from_dir.bos_id, from_dir.eos_id) == (1, 2)
    for text in PROSE + HARD + [INJECTION]:
        assert from_dir.encode(text) == mistral.encode(text), text


@pytest.mark.concept
def test_export_chat_template_renders_encode_chat(exported, mistral):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(exported))
    for chat in CHATS:
        for prompt in (False, True):
            ids, _ = encode_chat(mistral, chat, add_generation_prompt=prompt)
            got = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=prompt, return_dict=False)
            assert list(got) == ids, (chat, prompt)
    with pytest.raises(Exception, match='roles are system, user and assistant, not gpt'):
        hf.apply_chat_template([dict(role='gpt', content='x')], tokenize=False)


def test_export_of_an_exported_tokenizer_keeps_it(exported, tmp_path, mistral):
    Tokenizer.load(str(exported)).save_hf(str(tmp_path))  # e.g. sft.py from an exported model, exported again
    config = json.loads((tmp_path / 'tokenizer_config.json').read_text())
    assert config == json.loads((exported / 'tokenizer_config.json').read_text())
    assert Tokenizer.load(str(tmp_path)).encode(HARD[0]) == mistral.encode(HARD[0])


def _train_json(tmp_path, post_processor):
    tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(PROSE)] * 5 + ["the cat sat on the mat " * 20]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=['<unk>', '<s>', '</s>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
    tok.save(str(tmp_path / 'tokenizer.json'))
    return tmp_path / 'tokenizer.json'


@pytest.mark.parametrize('post_processor', [False, True])
def test_tokenizer_json_matches_transformers(tmp_path, post_processor):
    from transformers import PreTrainedTokenizerFast
    path = _train_json(tmp_path, post_processor)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    ours = Tokenizer.load(str(path))
    assert ours.kind == 'hf' and ours.vocab_size == hf.backend_tokenizer.get_vocab_size()
    assert (ours.bos_id, ours.eos_id) == (1, 2)  # found by their usual names
    for text in PROSE + WHITESPACE:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        # add_special_tokens adds exactly what the post_processor adds: BOS here, nothing without one
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True), text
        assert ours.decode(ours.encode(text, add_special_tokens=True) + [2]) == text
    assert ours.encode("x", add_special_tokens=True)[:1] == ([1] if post_processor else ours.encode("x")[:1])
    assert 2 not in ours.encode("</s>")  # special-token text stays text


def test_model_dir_prefers_json_and_reads_special_names(tmp_path):
    _train_json(tmp_path, post_processor=False)
    shutil.copy(MISTRAL_MODEL, tmp_path / 'tokenizer.model')
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': {'content': '</s>'}, 'eos_token': '<unk>'}))
    tok = Tokenizer.load(str(tmp_path))
    assert tok.kind == 'hf' and tok.spec == str(tmp_path) and (tok.bos_id, tok.eos_id) == (2, 0)


def test_tiktoken_wrapper(monkeypatch):
    import tiktoken
    ranks = {bytes([i]): i for i in range(256)} | {b'he': 256, b'll': 257, b'hell': 258}
    enc = tiktoken.Encoding('gpt2', pat_str=r"""'s|'t| ?\w+| ?[^\s\w]+|\s+""", mergeable_ranks=ranks,
                            special_tokens={'<|endoftext|>': 259})
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: enc)
    tok = Tokenizer.load('tiktoken:gpt2')
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (260, None, 259)
    text = "hello <|endoftext|> there"
    assert tok.encode(text) == enc.encode_ordinary(text) == tok.encode(text, add_special_tokens=True)
    assert tok.decode(tok.encode(text) + [259]) == text


def test_tiktoken_offline_error_is_one_line():
    try:  # every tiktoken encoding is downloaded on first use; works only with network or a warm cache
        tok = Tokenizer.load('tiktoken:gpt2')
    except ValueError as e:
        assert "tiktoken encoding 'gpt2'" in str(e) and '\n' not in str(e)
    else:
        assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'nope'"):
        Tokenizer.load('tiktoken:nope')


@pytest.mark.parametrize('spec, message', [
    ('no/such/path', "not 'mistral', 'tiktoken:NAME', or an existing file"),
    (__file__, 'is not a SentencePiece model'),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        Tokenizer.load(spec)
    assert '\n' not in str(e.value)


def test_bad_dir_and_json(tmp_path):
    with pytest.raises(ValueError, match='has neither tokenizer.json nor tokenizer.model'):
        Tokenizer.load(str(tmp_path))
    (tmp_path / 'tokenizer.json').write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match='is not a tokenizers JSON file') as e:
        Tokenizer.load(str(tmp_path))
    assert '\n' not in str(e.value)
