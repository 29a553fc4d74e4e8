# Moxin-7B's pre-training data (phases 1 and 2): SlimPajama-627B, DCLM-baseline-1.0 and part of
# the-stack-dedup, streamed from the Hugging Face hub and tokenized with Mistral's tokenizer.
#   python data.py config/data_moxin.py
# Needs network access; the-stack-dedup is gated (accept its terms, then `huggingface-cli login`).
out_dir = 'data/moxin'
# Weights are by tokens and relative, so they are written as token budgets in billions. The paper
# gives SlimPajama (627B) + DCLM-baseline (~1.4T together) + "part of" the-stack-dedup; the
# stack's share and its languages are our assumption.
sources = [
    dict(name='slimpajama', kind='hf', path='cerebras/SlimPajama-627B', weight=627),
    dict(name='dclm', kind='hf', path='mlfoundations/dclm-baseline-1.0', weight=773),
    # the stack's languages are interleaved one document from each in turn, each document once (data.py)
    dict(name='the-stack', kind='hf', path='bigcode/the-stack-dedup', text_field='content', weight=200,
         data_dirs=[f'data/{lang}' for lang in ('python', 'javascript', 'java', 'c', 'c++', 'go', 'rust', 'markdown')]),
]
max_tokens = 1_600_000_000_000   # moxin7b_phase1 reads 1.9e12 tokens: 1.19 epochs of this build
val_tokens = 2**24          # validation windows at 64 GPUs: phase 1 reads 20 x 4 x 64 = 5,120 of 2049 tokens
                            # (2^24 tokens hold 8,191), phase 2 20 x 2 x 64 = 2,560 of 4097 (they hold 4,095)
shard_tokens = 2**28        # 512 MB of uint16 per shard
# SlimPajama and the stack ship deduplicated and DCLM-baseline was deduplicated by its authors;
# cross-source MinHash over ~10^9 documents needs a cluster, not these in-memory tables.
dedup = False
