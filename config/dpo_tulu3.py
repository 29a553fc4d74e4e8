# Moxin-7B-Instruct: the SFT model (config/sft_tulu3.py) tuned with length-normalised DPO on the
# Tulu 3 preference data, with open-instruct's Tulu 3 8B DPO settings.
#   torchrun --nnodes=1 --nproc_per_node=8 dpo.py config/dpo_tulu3.py
#   python sample.py --ckpt out/moxin7b_dpo/final.pt --chat
# Sources: [moxin] the Moxin-LLM README and report (arXiv 2412.06845): Moxin-7B-Instruct is
# Moxin-7B-SFT trained with DPO on the Tulu 3 preference data (open-instruct's dpo_norm);
# [oi] open-instruct's configs/train_configs/tulu3/tulu3_dpo_8b.yaml (the Tulu 3 8B DPO run) and
# open_instruct/dpo_utils.py (the loss); [tulu3] the Tulu 3 report (Lambert et al. 2024, arXiv
# 2411.15124): length-normalised DPO, ~273k pairs for 8B; [assumption] = ours.
init_from = 'out/moxin7b_instruct/final.pt'  # [moxin] the SFT model: config/sft_tulu3.py's output
dataset = 'allenai/llama-3.1-tulu-3-8b-preference-mixture'  # [oi] dataset_mixer (1.0 of it); [moxin]; its card: 271,409
#   rows of id, prompt, chosen and rejected (lists of {role, content}), source: the schema dpo.py reads
out_dir = 'out/moxin7b_dpo'
heldout_pairs = 1000           # [assumption] open-instruct holds none out; 0.4% of the mixture, to report on
block_size = 2048              # [oi] max_seq_length 2048; a pair with a longer conversation is skipped
loss_type = 'dpo_norm'         # [oi] [tulu3] [moxin] length-normalised
beta = 5.0                     # [oi] beta: 5 (for dpo_norm's per-token log-probs; plain DPO uses ~0.1)
# global batch = 1 x 16 x 8 GPUs = 128 pairs ([oi] per_device_train_batch_size 1, gradient_accumulation_steps
# 16, "designed for 8 GPUs, so batch size 128"). On N GPUs grad_accum = 128 / N follows from it.
batch_size = 1
global_batch_size = 128
epochs = 1.0                   # [oi] num_epochs 1
lr = 5e-7                      # [oi] learning_rate 5.0e-7
warmup_ratio = 0.1             # [oi] warmup_ratio 0.1, lr_scheduler_type linear (to 0)
weight_decay = 0.0             # [oi]
betas = (0.9, 0.999)           # [oi] torch.optim.AdamW's defaults, which open-instruct keeps
eps = 1e-8                     # [oi] the same
grad_clip = 1.0                # [assumption] pre-training's clip; [oi] max_grad_norm -1 (no clipping) by default
compile = True                 # every batch has its own length, but after the first one Dynamo makes the length
                               # dynamic: 8 lengths compile 2 graphs (tests/test_dryrun.py), not one per length
activation_checkpointing = True  # [oi] gradient_checkpointing: true
ckpt_interval = 500            # [assumption] 271k pairs / 128 = ~2,120 steps ([oi] checkpointing_steps 1000)
keep_last = 2
log_interval = 1               # [oi] logging_steps 1
workers = 8                    # [assumption] tokenizing processes per rank ([oi] preprocessing_num_workers 16)
