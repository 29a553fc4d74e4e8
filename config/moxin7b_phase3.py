# Moxin-7B pre-training, phase 3 ("capability enhancement"): continue from phase 2 on data built
# from the training splits of the evaluation benchmarks (ARC, HellaSwag, PIQA, Winogrande, MMLU).
#   python data.py config/data_capability.py
#   torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \
#       --rdzv_id=moxin pretrain.py config/moxin7b_phase3.py
# Sources as in moxin7b_phase1.py: [cfg], [script], [paper], [assumption].
preset = 'moxin-7b'            # unused: the shape comes from init_from
init_from = 'out/moxin7b_phase2/final.pt'
data_dir = 'data/capability'   # [paper] "high-quality data from evaluation benchmarks"; its mix with
                               # general text is not published: [assumption] benchmark data alone, short
out_dir = 'out/moxin7b_phase3'
block_size = 4096              # [assumption] phase 2's context
# [assumption] 128 sequences = 524,288 tokens per step: the benchmark data is small (~10M tokens),
# so smaller steps give more of them. grad_accum = 128 / (2 x N): 8 on 8 GPUs, 1 on 64.
global_batch_size = 128
batch_size = 2
lr = 1e-5                      # [script] the README's multi-node example (--lr 1e-5) on a trained model
min_lr_ratio = 0.1             # [script]
warmup_steps = 10              # [assumption]
weight_decay = 0.1             # [script]
betas = (0.9, 0.95)            # [script]
eps = 1e-8
grad_clip = 1.0                # [script]
max_steps = 100                # [assumption] ~52M tokens: about 5 epochs of ~10M tokens of benchmark data
compile = True
activation_checkpointing = False  # [dry run] on 64 H100s it fits without: 60.32 GiB per GPU (8.18 with); set it
                               # True on 8 GPUs
ckpt_interval = 50
keep_last = 3
log_interval = 10
eval_interval = 50
eval_batches = 1                # x 2 x 64 GPUs = 128 windows: data_capability's val_tokens hold 255
