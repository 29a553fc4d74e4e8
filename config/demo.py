# The demo, which is also pretrain.py's defaults: a 11.3M-parameter model ('demo' preset: 4 layers,
# dim 256, Mistral's 32k vocabulary, tied embeddings) on the embedded corpus (`python data.py`:
# this Python's docs and standard library, 3.7M tokens). About 5-8 minutes on 2 CPU cores.
#   python data.py && python pretrain.py config/demo.py && python sample.py --ckpt out/final.pt
preset = 'demo'
data_dir = 'data/pydoc'
out_dir = 'out'
block_size = 256
batch_size = 8                 # x 1 accumulation x 1 process = 2,048 tokens per step
grad_accum = 1
lr = 2e-3                      # small models take large learning rates
warmup_steps = 20
max_steps = 200                # 410K tokens, about a ninth of an epoch
ckpt_interval = 100
log_interval = 10
eval_interval = 50
eval_batches = 4
