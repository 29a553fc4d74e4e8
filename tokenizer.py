"""
The tokenizer and the chat format: the two things every stage needs to turn text into the
token ids a model reads (nanochat's tokenizer.py holds the same pair).

    Tokenizer.load('mistral')        Mistral's v1 SentencePiece model (Moxin-7B's), from mistral-common
    Tokenizer.load('tiktoken:gpt2')  a tiktoken encoding
    Tokenizer.load(path)             a tokenizer.json / tokenizer.model file, or an HF model directory

    encode_chat(tokenizer, messages) -> (ids, loss mask) in Moxin's (Tulu's) chat template,
    the one template sft.py trains on and dpo.py, grpo.py, eval.py --chat and sample.py --chat render.
"""
import importlib.resources
import json
import os
import shutil


class Tokenizer:
    """One interface over the three tokenizer formats a checkpoint may come with.

    Special-token strings inside text (e.g. a literal "</s>" in a web page) are always
    encoded as plain text, so data can never inject a BOS/EOS; special tokens come
    only from add_special_tokens=True or from code that appends .eos_id itself.
    """

    def __init__(self, spec, kind, impl, vocab_size, bos_id, eos_id, path=None):
        self.spec, self.kind, self.impl, self.path = spec, kind, impl, path
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id

    @classmethod
    def load(cls, spec):
        if spec == 'mistral':  # Mistral's v1 SentencePiece model, the one Moxin-7B uses
            return cls._sentencepiece(spec, str(importlib.resources.files('mistral_common') / 'data' / 'tokenizer.model.v1'))
        if spec.startswith('tiktoken:'):
            return cls._tiktoken(spec, spec.removeprefix('tiktoken:'))
        if os.path.isdir(spec):  # an HF model dir: tokenizer.json is what transformers prefers too
            for name in ('tokenizer.json', 'tokenizer.model'):
                if os.path.isfile(os.path.join(spec, name)):
                    return cls._from_file(spec, os.path.join(spec, name))
            raise ValueError(f"tokenizer dir {spec} has neither tokenizer.json nor tokenizer.model")
        if os.path.isfile(spec):
            return cls._from_file(spec, spec)
        raise ValueError(f"tokenizer '{spec}' is not 'mistral', 'tiktoken:NAME', or an existing file or directory")

    @classmethod
    def _from_file(cls, spec, path):
        if path.endswith('.json'):
            return cls._hf_json(spec, path)
        return cls._sentencepiece(spec, path)

    @classmethod
    def _sentencepiece(cls, spec, path):
        import sentencepiece
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a SentencePiece model: {str(e).splitlines()[0]}") from None
        none_if_negative = lambda i: i if i >= 0 else None
        return cls(spec, 'sentencepiece', sp, sp.vocab_size(), none_if_negative(sp.bos_id()), none_if_negative(sp.eos_id()), path)

    @classmethod
    def _tiktoken(cls, spec, name):
        import tiktoken
        if name not in tiktoken.list_encoding_names():
            raise ValueError(f"unknown tiktoken encoding '{name}' (known: {', '.join(tiktoken.list_encoding_names())})")
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # every encoding downloads its BPE file on first use
            raise ValueError(f"tiktoken encoding '{name}' is not cached and could not be downloaded "
                             f"({type(e).__name__}); run it once with network access or set TIKTOKEN_CACHE_DIR") from None
        tok = cls(spec, 'tiktoken', enc, enc.n_vocab, None, enc.eot_token)
        tok.special_ids = {enc.encode_single_token(t) for t in enc.special_tokens_set}
        return tok

    @classmethod
    def _hf_json(cls, spec, path):
        import tokenizers
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path} is not a tokenizers JSON file: {str(e).splitlines()[0]}") from None
        tok.encode_special_tokens = True  # see the class docstring
        # transformers keeps the names of BOS/EOS beside tokenizer.json; fall back to the usual names
        config_path = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
        config = json.load(open(config_path)) if os.path.isfile(config_path) else {}
        def special(key, usual):
            name = config.get(key)
            names = [name.get('content') if isinstance(name, dict) else name] if name else usual
            ids = [tok.token_to_id(n) for n in names if n and tok.token_to_id(n) is not None]
            return ids[0] if ids else None
        bos = special('bos_token', ['<s>', '<|begin_of_text|>', '<|startoftext|>'])
        eos = special('eos_token', ['</s>', '<|end_of_text|>', '<|endoftext|>', '<|eot_id|>'])
        return cls(spec, 'hf', tok, tok.get_vocab_size(with_added_tokens=True), bos, eos, path)

    def encode(self, text, add_special_tokens=False):
        if self.kind == 'sentencepiece':  # SentencePiece itself adds nothing; Mistral's convention is BOS only
            ids = self.impl.encode(text)
            return [self.bos_id] + ids if add_special_tokens and self.bos_id is not None else ids
        if self.kind == 'tiktoken':  # tiktoken has no default special tokens
            return self.impl.encode_ordinary(text)
        return self.impl.encode(text, add_special_tokens=add_special_tokens).ids  # the post_processor decides

    def decode(self, ids):
        """Text of `ids`, with BOS/EOS and other special tokens left out."""
        ids = [int(i) for i in ids]
        if self.kind == 'tiktoken':
            return self.impl.decode([i for i in ids if i not in self.special_ids])
        if self.kind == 'hf':
            return self.impl.decode(ids, skip_special_tokens=True)
        return self.impl.decode(ids)

    def save_hf(self, out_dir):
        """Write this tokenizer's files into an HF model directory (weights.export_hf writes the
        weights): tokenizer.json and a tokenizer_config.json with Moxin's chat template, so that
        transformers (and vLLM, lm-evaluation-harness, ...) give the ids this model trained on.
        A SentencePiece model is also copied as tokenizer.model (llama.cpp's converter reads it)."""
        if self.kind == 'tiktoken':
            raise ValueError(f"tokenizer {self.spec}: a tiktoken encoding has no HF tokenizer file to export")
        os.makedirs(out_dir, exist_ok=True)
        config = {}
        if self.kind == 'hf':
            shutil.copy(self.path, os.path.join(out_dir, 'tokenizer.json'))
            config_path = os.path.join(os.path.dirname(self.path), 'tokenizer_config.json')
            config = json.load(open(config_path)) if os.path.isfile(config_path) else {}
        else:
            shutil.copy(self.path, os.path.join(out_dir, 'tokenizer.model'))
            sentencepiece_as_tokenizers(self.impl).save(os.path.join(out_dir, 'tokenizer.json'))
            # PreTrainedTokenizerFast keeps tokenizer.json as it is; LlamaTokenizer would rebuild
            # its own pipeline, which splits runs of spaces unlike SentencePiece
            config = dict(tokenizer_class='PreTrainedTokenizerFast', bos_token='<s>', eos_token='</s>',
                          unk_token='<unk>', add_bos_token=True, add_eos_token=False)
        config['chat_template'] = CHAT_TEMPLATE
        with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
            json.dump(config, f, indent=2)

    def __repr__(self):
        return f"Tokenizer({self.spec!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def sentencepiece_as_tokenizers(sp):
    """A `tokenizers` Tokenizer that splits text exactly as SentencePiece BPE model `sp` does, the
    way transformers' legacy Llama conversion did: the dummy-prefix "▁" and spaces as "▁" in the
    normalizer (SentencePiece's identity normalization, with add_dummy_prefix), no pre-tokenizer,
    so runs of spaces merge as they do in SentencePiece; merges ranked by the merged piece's score;
    byte fallback for characters outside the vocabulary. Checked on probe strings before use."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = {i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges = []
    for i in normal:
        piece = sp.id_to_piece(i)
        for k in range(1, len(piece)):
            left, right = vocab.get(piece[:k]), vocab.get(piece[k:])
            if left in normal and right in normal:
                merges.append((-sp.get_score(i), i, left, (piece[:k], piece[k:])))
    merges = [pair for *_, pair in sorted(merges)]
    unk = sp.id_to_piece(sp.unk_id())
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Replace(' ', '▁')])
    tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(' ', 1, 0)])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                            for i in range(n) if sp.is_control(i) or sp.is_unknown(i)])
    if sp.bos_id() >= 0:  # transformers' add_special_tokens=True adds BOS, as Mistral does
        bos = sp.id_to_piece(sp.bos_id())
        tok.post_processor = processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A {bos} $B',
                                                           special_tokens=[(bos, sp.bos_id())])
    tok.encode_special_tokens = True  # only for the check: SentencePiece reads "</s>" in text as text
    for probe in ('Hello world', ' a  b\t\tc\n\n   d', 'def f(x):\n    return x  ', 'café 日本語 🤖 \u200b', '2024: 3.14!'):
        if tok.encode(probe, add_special_tokens=False).ids != sp.encode(probe):
            raise ValueError(f"this SentencePiece model does not split {probe!r} as its tokenizers conversion "
                             f"does: it cannot be exported as tokenizer.json")
    tok.encode_special_tokens = False  # transformers' default: the chat template's </s> is EOS
    return tok


# Moxin's (Tulu's) chat template as transformers' apply_chat_template renders it: the text encode_chat
# builds (an EOS closes each reply, then a newline), and "<|assistant|>\n" as the generation prompt.
# Each piece between BOS/EOS is tokenized on its own with its dummy prefix, as encode_chat does.
CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token + '\\n' }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- chat format

CHAT_ROLES = ('system', 'user', 'assistant')


def encode_chat(tokenizer, messages, block_size=None, add_generation_prompt=False):
    """Token ids and loss mask (1 = trained on) of a conversation in Moxin's (Tulu's) template:

        <|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n...</s>\\n

    Tags are plain text; </s> is the EOS token, and BOS starts the conversation as it starts
    a pre-training document. The text between two EOS tokens is encoded in one piece, as a
    tokenizer sees a whole string, and the mask marks the tokens past the prefix that ends
    with "<|assistant|>\\n": the assistant's reply and its EOS. add_generation_prompt ends the
    ids with "<|assistant|>\\n", tokenized as in training, for the model to write the reply.
    """
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    mask, text = [0] * len(ids), ''
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get('role') not in CHAT_ROLES or not isinstance(message.get('content'), str):
            raise ValueError(f"message {n}: expected {{'role': one of {', '.join(CHAT_ROLES)}, 'content': str}}, got {message!r}")
        text += f"<|{message['role']}|>\n"
        if message['role'] != 'assistant':
            text += message['content'] + '\n'
            continue
        prompt, reply = tokenizer.encode(text), tokenizer.encode(text + message['content'])
        if reply[:len(prompt)] != prompt:
            raise ValueError(f"message {n}: tokenizer {tokenizer.spec} merges tokens across the '<|assistant|>\\n' tag")
        ids += reply + [tokenizer.eos_id]
        mask += [0] * len(prompt) + [1] * (len(reply) - len(prompt) + 1)
        text = '\n'
    if add_generation_prompt:
        text += '<|assistant|>\n'
    if text:  # the newline after the last EOS, or a prompt the model has not answered yet
        tail = tokenizer.encode(text)
        ids, mask = ids + tail, mask + [0] * len(tail)
    return ids[:block_size], mask[:block_size]
