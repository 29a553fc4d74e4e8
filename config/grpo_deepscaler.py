# Moxin-7B-Reasoning's GRPO stage with DeepScaleR's recipe (DeepScaleR-1.5B-Preview, agentica-project,
# Feb 2025; its verl scripts, now in rllm: scripts/train/run_deepscaler_1.5b_{8k,16k,24k}.sh):
#   torchrun --nproc_per_node=8 grpo.py config/grpo_deepscaler.py
# The Moxin report trains Moxin-7B-Reasoning from the instruct model, SFT'd on chain-of-thought data
# distilled from DeepSeek-R1, then GRPO "with DeepScaleR's recipe"; it gives no GRPO numbers of its own,
# so every number below is DeepScaleR's (a 1.5B model) unless marked [assumption].
init_from = 'out/sft_reasoning/final.pt'  # [assumption] the instruct model after the chain-of-thought SFT
dataset = 'agentica-org/DeepScaleR-Preview-Dataset'  # 40.3k {problem, answer, solution} rows (the scripts' train.parquet,
                                # built from it by scripts/data/deepscaler_dataset.py with chats.math_prompt's instruction)
eval_dataset = ''               # AIME in the scripts (data.val_files=aime.parquet); here `python eval.py` does MATH-500
eval_samples = 16               # when an eval_dataset is set: DeepScaleR's blog reports pass@1 averaged over 16 samples
# response length schedule: 8k, then 16k, then 24k (data.max_response_length=8192 / 16384 / 24576 in the
# three scripts; data.max_prompt_length=1024). Run this file, then resume with --max_new_tokens=16384
# --block_size=17408 --group_size=16, then 24576 / 25600; when to switch is DeepScaleR's blog's call
# (when the 8k responses start to be cut off) [assumption: no step count is in the scripts]
max_new_tokens = 8192
block_size = 1024 + 8192        # max_prompt_length + max_response_length: longer prompts are skipped, as verl filters them
prompts_per_step = 128          # data.train_batch_size=128
group_size = 8                  # actor_rollout_ref.rollout.n=8 at 8k; 16 at 16k and 24k
temperature = 0.6               # actor_rollout_ref.rollout.temperature=0.6
top_p = 1.0                     # verl's default (the scripts do not set it)
clip_eps = 0.2                  # verl's default actor.clip_ratio (the scripts do not set it)
kl_coef = 0.001                 # actor.use_kl_loss=True, kl_loss_coef=0.001, kl_loss_type=low_var_kl (= k3)
adv_eps = 1e-6                  # verl's compute_grpo_outcome_advantage epsilon
# not here: verl's default actor.entropy_coeff=0.001 of that time (an entropy bonus the scripts leave on);
# grpo.py has no entropy term, so this run differs from DeepScaleR's there [assumption: a small effect]
ppo_epochs = 1                  # actor.ppo_epochs=1 (16k/24k scripts; verl's default)
mini_batches = 2                # actor.ppo_mini_batch_size=64 of train_batch_size=128 prompts: 2 updates per step
micro_batch_tokens = 32768      # actor.ppo_max_token_len_per_gpu=32768 (use_dynamic_bsz=True): memory only
rollout_rows = 64               # [dry run] completions generated at once per GPU: at 16k/24k on 8 H100s all 256 of a
                                # rank's completions would need 144 GiB of KV cache; 64 fit (36 GiB) beside the rest
lr = 1e-6                       # actor.optim.lr=1e-6
warmup_steps = 0                # verl's default lr_warmup_steps_ratio=0: constant
min_lr_ratio = 1.0              # constant (verl's default warmup style 'constant')
weight_decay = 0.01             # verl's default actor optim weight_decay
betas = (0.9, 0.999)            # verl's AdamW (torch defaults)
grad_clip = 1.0                 # verl's default actor.grad_clip
max_steps = 1000                # [assumption] the scripts run trainer.total_epochs=30 over 40k problems and stop by hand
activation_checkpointing = True  # model.enable_gradient_checkpointing=True
out_dir = 'out/grpo_deepscaler'
ckpt_interval = 20              # trainer.save_freq=20 at 8k (10 at 16k and 24k)
log_interval = 1
