# Moxin-7B pre-training, phase 2: context 2k -> 4k, continuing from phase 1's final weights.
#   torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \
#       --rdzv_id=moxin pretrain.py config/moxin7b_phase2.py
# Sources as in moxin7b_phase1.py: [cfg], [script], [paper], [assumption].
preset = 'moxin-7b'            # unused: the shape comes from init_from
init_from = 'out/moxin7b_phase1/final.pt'
data_dir = 'data/moxin'        # [paper] the same mixture, at longer context
out_dir = 'out/moxin7b_phase2'
block_size = 4096              # [paper] phase 2 is 4k context; 4096 = the window: still plain causal
# [assumption] the same 512 sequences per step as phase 1 (the script's batch is counted in
# sequences) = 2,097,152 tokens. grad_accum = 512 / (2 x N): 32 on 8 GPUs, 4 on 64.
global_batch_size = 512
batch_size = 2
lr = 2e-5                      # [script] the README's single-node example (--lr 2e-5), which continues
                               # an already-trained model; a full 3e-4 re-warm would undo phase 1's decay
min_lr_ratio = 0.1             # [script]
warmup_steps = 200             # [assumption] short: the weights are trained already
weight_decay = 0.1             # [script]
betas = (0.9, 0.95)            # [script]
eps = 1e-8
grad_clip = 1.0                # [script]
max_steps = 50_000             # [assumption] ~100B tokens: 1e11 / 2,097,152 = 47,684, rounded up
compile = True
activation_checkpointing = False  # [dry run] on 64 H100s it fits without: 60.79 GiB per GPU (8.64 with), and no
                               # recomputed forward: 4,060 -> 3,056 GPU-hours. On 8 GPUs it does not: set it True there
ckpt_interval = 500
keep_last = 3
log_interval = 10
eval_interval = 500
eval_batches = 20
