# vldac.py's flags made whole: the defaults tables (the paper's Table 6, the tiny model's), the baselines' presets,
# and every check on the flags, all before any work (a model loaded, an env made, a run directory written).
import importlib.util

import envs
import flags
import vlm
from distributed import WORLD_SIZE
from flags import fail

# Table 6 of the paper (and the authors' code where the paper is silent), for real checkpoints.
PAPER_DEFAULTS = dict(total_timesteps=51_200, num_envs=16, num_steps=16, minibatch_size=128, micro_batch_size=4,
                      learning_rate=5e-5, end_learning_rate=1e-7, update_epochs=2, vf_coef=0.15, kl_beta=0.05,
                      value_warmup_iters=2, max_grad_norm=0.01, max_new_tokens=256, lora_r=16, lora_alpha=32)
# The tiny model (1.5M parameters, CPU): full fine-tune, a larger learning rate, short answers; 16 Adam steps per
# rollout (4 epochs of 32-step minibatches: at 4, some builds learned too slowly) and beta 0.2 (at 0.05 the extra
# steps wore down the caption probe). Measured: docs/results.md.
TINY_DEFAULTS = dict(total_timesteps=12_288, num_envs=16, num_steps=8, minibatch_size=32, micro_batch_size=32,
                     learning_rate=3e-4, end_learning_rate=3e-5, update_epochs=4, vf_coef=0.15, kl_beta=0.2,
                     value_warmup_iters=2, max_grad_norm=1.0, max_new_tokens=48, lora_r=0, lora_alpha=32)
GAE_DEFAULTS = {"gym_cards": dict(gamma=1.0, gae_lambda=1.0), "MiniWorld": dict(gamma=0.99, gae_lambda=0.95)}
# --baseline presets: what each method changes relative to VL-DAC. RL4VLM: one ratio per step on
# thought_coef * log pi(thoughts) + log pi(action), no KL, no warm-up, the value loss trains the backbone. LOOP: no
# critic, whole episodes, K per task, each episode's leave-one-out advantage on all its tokens, no KL.
BASELINES = {"vldac": {},
             "rl4vlm": dict(policy_loss="rl4vlm", kl_beta=0.0, value_warmup_iters=0, value_stop_grad=False),
             "loop": dict(kl_beta=0.0, vf_coef=0.0, value_warmup_iters=0)}


def resolve_args(args, built=False):
    """Fill every None from the defaults tables (a --baseline's preset first), refuse bad input, derive sizes.
    built: the model is made in memory (benchmarks' random layouts), so --model-id names nothing to look for."""
    preset = BASELINES[args.baseline]
    given = {key: getattr(args, key) for key in preset if getattr(args, key) is not None}
    family = "gym_cards" if args.env_id in envs.CARD_IDS else "MiniWorld"
    defaults = {**(TINY_DEFAULTS if vlm.is_tiny(args.model_id) else PAPER_DEFAULTS), **GAE_DEFAULTS[family]}
    for key, value in {**defaults, **preset}.items():
        if key in preset or getattr(args, key) is None:
            setattr(args, key, value)
    check_args(args, given, built)
    args.batch_size = args.num_envs * args.num_steps
    # torchrun: every rank rolls out; LOOP's rollouts are whole episodes of varying length (total_timesteps bounds it)
    args.num_iterations = args.total_timesteps // (args.num_envs if args.baseline == "loop" else args.batch_size
                                                   * WORLD_SIZE)
    return args


def check_args(args, given, built=False):
    """Every refusal that needs no model, before any work: each flag's own domain (flags.TRAIN), then what flags
    ask of each other. given: the flags a --baseline preset sets that were given on the command line."""
    flags.check(args, flags.TRAIN)
    if args.env_id not in envs.ENV_IDS:
        fail(f"unknown --env-id {args.env_id!r}; valid ids: {', '.join(envs.ENV_IDS)}")
    for key, value in given.items():
        if value != BASELINES[args.baseline][key] and key not in ("policy_loss", "value_stop_grad"):
            fail(f"--baseline {args.baseline} sets --{key.replace('_', '-')} {BASELINES[args.baseline][key]}; for "
                 f"another value give the flags it stands for instead (see --help)")
    loop, batch_size = args.baseline == "loop", args.num_envs * args.num_steps
    if not loop and (args.minibatch_size > batch_size or batch_size % args.minibatch_size):
        fail(f"--minibatch-size {args.minibatch_size} must divide num_envs * num_steps = {batch_size}")
    if args.minibatch_size % args.micro_batch_size:
        fail(f"--micro-batch-size {args.micro_batch_size} must divide --minibatch-size {args.minibatch_size}")
    if args.total_timesteps < (args.num_envs if loop else batch_size * WORLD_SIZE):
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout "
             f"({batch_size * WORLD_SIZE} env steps over {WORLD_SIZE} rank(s))")
    if loop and args.num_envs % args.loop_group_size:
        fail(f"--loop-group-size must be >= 2 and divide --num-envs {args.num_envs}, got {args.loop_group_size}")
    if loop and WORLD_SIZE > 1:  # ranks would take different numbers of optimizer steps
        fail("--baseline loop runs in one process (its rollouts differ in length between ranks)")
    if args.reward_shaping and args.env_id not in envs.MINIWORLD_IDS:
        fail(f"--reward-shaping is for MiniWorld only, got {args.reward_shaping} on {args.env_id}")
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("--track needs Weights and Biases: pip install wandb")
    if args.merge_lora_rollout and args.lora_r == 0:
        fail("--merge-lora-rollout needs LoRA (--lora-r > 0): a full fine-tune has no adapter to merge")
    if not built:  # a model that is not there: say so before anything loads
        vlm.locate(args.model_id, args.env_id)
