# Moxin-7B phase 3 ("capability enhancement"): the training splits of the benchmarks eval.py
# scores, rendered in exactly eval.py's prompt format, one solved question per document.
#   python data.py config/data_capability.py
# reads the HF hub; offline, add data_dir='DIR' to the source to read DIR/<task>/<split>.jsonl
# files in the HF schema, the same layout as `eval.py --data_dir`.
out_dir = 'data/capability'
sources = [
    # 'name:split' picks a split; a bare name reads the task's training split (MMLU's is 'dev')
    dict(name='benchmarks', kind='capability', weight=1,
         tasks=['arc_easy', 'arc_challenge', 'hellaswag', 'piqa', 'winogrande', 'mmlu']),
]
min_chars = 0               # a benchmark question is short by nature; the 200-character rule is for web text
# validation: moxin7b_phase3 reads eval_batches 1 x batch 2 x 64 GPUs = 128 windows of 4097 tokens, and
# pretrain.py stops before building the model when there are fewer; 2^20 tokens hold 255 of them (~10%
# of the ~10M tokens of benchmark data)
val_tokens = 2**20
shard_tokens = 2**24
