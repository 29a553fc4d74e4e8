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
        """Write this tokenizer's files into an HF model directory (model.export_hf writes the weights)."""
        if self.kind == 'tiktoken':
            raise ValueError(f"tokenizer {self.spec}: a tiktoken encoding has no HF tokenizer file to export")
        os.makedirs(out_dir, exist_ok=True)
        if self.kind == 'hf':
            shutil.copy(self.path, os.path.join(out_dir, 'tokenizer.json'))
            config = os.path.join(os.path.dirname(self.path), 'tokenizer_config.json')
            if os.path.isfile(config):
                shutil.copy(config, os.path.join(out_dir, 'tokenizer_config.json'))
            return
        shutil.copy(self.path, os.path.join(out_dir, 'tokenizer.model'))
        # transformers reads a SentencePiece model through LlamaTokenizer, which adds BOS as Mistral's does
        config = dict(tokenizer_class='LlamaTokenizer', add_bos_token=True, add_eos_token=False, legacy=True,
                      bos_token='<s>', eos_token='</s>', unk_token='<unk>')
        with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
            json.dump(config, f, indent=2)

    def __repr__(self):
        return f"Tokenizer({self.spec!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


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
