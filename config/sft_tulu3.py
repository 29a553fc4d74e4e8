# Moxin-7B instruct: the base model fine-tuned on the Tulu 3 SFT mixture (939k conversations) with
# open-instruct's Tulu 3 settings.
#   torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \
#       --rdzv_id=moxin-instruct sft.py config/sft_tulu3.py
#   python dryrun.py sft.py config/sft_tulu3.py --gpus=64 --dataset_conversations=939343   # memory and cost (HF card: 939,343 rows)
#   python sample.py --ckpt out/moxin7b_instruct/final.pt --chat
# Sources: [moxin] the Moxin report (arXiv 2412.06845) and moxin-ai.org: Moxin-Instruct is the base
# model fine-tuned with the Tulu 3 framework; [tulu3] the Tulu 3 paper (Lambert et al. 2024, arXiv
# 2411.15124), its SFT hyperparameters; [oi] open-instruct's configs/train_configs/tulu3/tulu3_sft.yaml
# and open_instruct/finetune.py; [moxin-sft] Moxin's own command, finetune/instruct_finetune/sft_finetune.sh
# in github.com/moxin-org/Moxin-LLM (8 nodes x 8 GPUs, batch 1, accumulation 2, lr 5e-6, 2 epochs, 4096
# tokens, --reduce_loss sum); [assumption] = ours.
init_from = 'out/moxin7b_phase3/final.pt'  # the base model after pre-training (or an HF dir of moxin-llm-7b)
dataset = 'allenai/tulu-3-sft-mixture'     # [moxin] [tulu3]
out_dir = 'out/moxin7b_instruct'
block_size = 4096              # [tulu3] [oi] max_seq_length 4096; longer conversations are cut
# global batch 128 conversations ([tulu3] [oi] batch 1 per GPU x accumulation 2 x 8 nodes of 8 GPUs);
# grad_accum = 128 / N: 16 on 8 GPUs, 2 on 64.
global_batch_size = 128        # [tulu3] [oi] [moxin-sft] 64 GPUs x 1 x 2
batch_size = 1                 # [oi] no padding at all
loss_reduction = 'sum'         # [moxin-sft] --reduce_loss sum, as [oi]'s Tulu 3 script: every trained token of a
                               # step weighs the same, however long its conversation. open-instruct sums without
                               # dividing; we divide by the step's trained tokens, the same direction, and AdamW's
                               # update does not depend on the scale (grad_clip below sees a per-token norm)
epochs = 2                     # [tulu3] [oi]
lr = 5e-6                      # [tulu3] [oi] 5.0e-06
warmup_ratio = 0.03            # [tulu3] [oi] then linear decay to 0
weight_decay = 0.0             # [tulu3] [oi]
betas = (0.9, 0.999)           # [oi] torch.optim.AdamW's defaults, which finetune.py keeps
eps = 1e-8                     # [oi] the same
grad_clip = 1.0                # [assumption] pre-training's clip; [oi] does not clip by default
compile = True                 # every batch has its own length, but after the first one Dynamo makes the length
                               # dynamic: 8 lengths compile 2 graphs (tests/test_dryrun.py), not one per length
activation_checkpointing = True  # [assumption] 4096 tokens of a 7B model per GPU, with room to spare
ckpt_interval = 500            # [assumption] 2 epochs x 939k / 128 = ~14,700 steps
keep_last = 2
log_interval = 10
workers = 8                    # [assumption] tokenizing processes per rank: 64 on an 8-GPU node
