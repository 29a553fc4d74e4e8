# Moxin-7B chat: the base model fine-tuned on the Tulu v2 SFT mixture (326k conversations: FLAN,
# CoT, Open Assistant 1, ShareGPT, GPT4-Alpaca, Code-Alpaca, LIMA, WizardLM, Open-Orca, ...).
#   torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \
#       --rdzv_id=moxin-chat sft.py config/sft_tulu2.py
#   python dryrun.py sft.py config/sft_tulu2.py --gpus=64 --dataset_conversations=326154   # memory and cost (HF card: 326,154 rows)
#   python sample.py --ckpt out/moxin7b_chat/final.pt --chat
# Sources: [design] the project's design notes (Moxin's chat model = the base model + the Tulu v2
# mixture, Tulu's template, loss on assistant turns); [tulu2] the Tulu 2 paper (Ivison et al. 2023,
# arXiv 2311.10702), its training details; [oi] open-instruct, the code Tulu is trained with:
# configs/train_configs/sft/tulu2_7b.yaml and open_instruct/finetune.py; [assumption] = ours.
init_from = 'out/moxin7b_phase3/final.pt'  # the base model after pre-training (or an HF dir of moxin-llm-7b)
dataset = 'allenai/tulu-v2-sft-mixture'    # [design]
out_dir = 'out/moxin7b_chat'
block_size = 8192              # [tulu2] max sequence length 8,192 ([oi]'s yaml cuts it to 4096 to fit one GPU);
                               # longer conversations are cut, as open-instruct cuts them
# global batch 128 conversations: [tulu2] effective batch size 128; grad_accum = 128 / N: 16 on 8 GPUs, 2 on 64.
global_batch_size = 128        # [tulu2]
batch_size = 1                 # [oi] per-device batch 1: no padding at all
loss_reduction = 'mean'        # [oi] finetune.py's default --reduce_loss mean: each micro-batch's mean weighs the same
epochs = 2                     # [tulu2] two epochs ([oi]'s yaml has 3)
lr = 2e-5                      # [tulu2] 2e-5 for 7B and 13B models; [oi] 2.0e-05
warmup_ratio = 0.03            # [tulu2] [oi] then linear decay to 0
weight_decay = 0.0             # [tulu2] [oi]
betas = (0.9, 0.999)           # [oi] torch.optim.AdamW's defaults, which finetune.py keeps
eps = 1e-8                     # [oi] the same
grad_clip = 1.0                # [assumption] pre-training's clip; [oi] does not clip by default
compile = False                # [assumption] at 8k the window's band goes to FlexAttention, whose block mask changes
                               # with every length: not measured compiled yet (2 graphs for 8 lengths below the window)
activation_checkpointing = True  # [assumption] 8192 tokens of a 7B model per GPU
ckpt_interval = 250            # [assumption] 2 epochs x 326k / 128 = ~5,100 steps
keep_last = 2
log_interval = 10
workers = 8                    # [assumption] tokenizing processes per rank: 64 on an 8-GPU node
