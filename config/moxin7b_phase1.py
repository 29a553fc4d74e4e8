# Moxin-7B pre-training, phase 1: from scratch at 2k context on the main mixture.
#   python data.py config/data_moxin.py           # SlimPajama-627B + DCLM-baseline-1.0 + the-stack-dedup
#   torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \
#       --rdzv_id=moxin pretrain.py config/moxin7b_phase1.py
# Sources: [cfg] = HF config of moxin-llm-7b, [script] = Moxin's released train/pretrain.py and
# its README commands (github.com/moxin-org/Moxin-LLM), [paper] = the technical report
# (arXiv 2412.06845); [assumption] = ours, where none of them says.
preset = 'moxin-7b'            # [cfg] 36 layers, dim 4096, 32/8 heads, SwiGLU 14336, window 4096: 8.1B params
data_dir = 'data/moxin'
out_dir = 'out/moxin7b_phase1'
block_size = 2048              # [paper] phase 1 is 2k context ([script] --max_length 2048); 2048 <= window: plain causal
# [script] the multi-node command runs 8 nodes x 8 GPUs x batch 1 x accumulation 8 (its default)
# = 512 sequences of 2048 = 1,048,576 tokens per step. grad_accum follows from the GPU count:
# 512 / (4 x N): 16 on 8 GPUs, 2 on 64; N must divide 128.
global_batch_size = 512        # [script] sequences per optimizer step
batch_size = 4                 # [assumption] per GPU; fits an 80 GB GPU with activation checkpointing
lr = 3e-4                      # [script] default --lr. The paper's "2e-6" matches no released script and
                               # is ~100x below what trains a 7B model from scratch; the README's 1e-5/2e-5
                               # are for continuing an already-trained model (--expanded_model), see phases 2-3.
min_lr_ratio = 0.1             # [script] CosineAnnealingWarmupLR(eta_min=0.1 * lr)
warmup_steps = 2000            # [script] default --warmup_steps
weight_decay = 0.1             # [script] default; we decay matrices only ([script] decays every parameter)
betas = (0.9, 0.95)            # [script] HybridAdam(betas=(0.9, 0.95))
eps = 1e-8                     # [assumption] AdamW's default; the script does not set it
grad_clip = 1.0                # [script] default --grad_clip
# token budget: [paper] >2T tokens over all phases, ~1.4T from SlimPajama + DCLM plus the stack.
# [assumption] nearly all of it here, at 2k context where it is cheapest: 1.9T tokens.
max_steps = 1_812_000          # 1.9e12 / 1,048,576 tokens per step. data_moxin builds ~1.6e12 tokens, so this
                               # is 1.19 epochs: every window once, then ~19% of them again, in a new order
compile = True                 # [assumption] speed; bf16 compute + fp32 reduce comes with FSDP2 on CUDA
activation_checkpointing = False  # [dry run] on 64 H100s it fits without ([script] turns it on, -g): 60.75 GiB per
                               # GPU instead of 8.61, and no recomputed forward: 68,736 -> 51,749 GPU-hours at the same
                               # hardware FLOP/s. On 8 GPUs (8x the sharded state per GPU) it does not: set it True there
ckpt_interval = 1000           # [assumption] ~40 min of 64 H100s at 40% MFU
keep_last = 3
log_interval = 10
eval_interval = 1000
eval_batches = 20
