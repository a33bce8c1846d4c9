# Command-line input of vldac.py and evaluate.py: the domain of every numeric and path flag, checked in one place
# before any work, and the one-line refusal. Imports nothing of the project, so that any module can refuse input.
import dataclasses
import math
import sys
from pathlib import Path


def fail(message):
    """Bad input: one line on stderr naming the script, exit code 2 (as argparse/tyro do)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _number(x):
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Range:
    """Numbers from low to high; an open end excludes the bound itself. Floats must be finite (no NaN, no inf)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value):
        return (math.isfinite(value) and (value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high))

    def __str__(self):
        if self.low > -math.inf and self.high < math.inf:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"a number in {left}{_number(self.low)}, {_number(self.high)}{right}"
        if self.low > -math.inf:
            return f"a number {'>' if self.low_open else '>='} {_number(self.low)}"
        return "a finite number"


@dataclasses.dataclass(frozen=True)
class PathTo:
    """A path the script creates: a `dir`ectory, or a `file` (whose parent it creates). No existing part of it may be
    a regular file, and a file's path may not be an existing directory. `run`: an existing directory it reads."""

    kind: str

    def holds(self, value):
        path = Path(value).expanduser()
        if self.kind == "run":
            return path.is_dir()
        blocking = [p for p in [path, *path.parents] if p.exists() and not p.is_dir()]
        return not blocking and not (self.kind == "file" and path.is_dir())

    def __str__(self):
        return {"run": "an existing run directory", "dir": "a directory path (no part of it a regular file)",
                "file": "a file path (not a directory; no part of its parent a regular file)"}[self.kind]


def at_least(low):
    return Range(low)


def above(low):
    return Range(low, low_open=True)


UNIT = Range(0.0, 1.0)  # probabilities, discounts, GAE's lambda
COUNT = at_least(1)
OFF_OR_COUNT = at_least(0)  # 0 means "off" (or "one per core" for --threads)
SEED = Range(0, 2**32 - 1)  # numpy's seed range
TEXT = None  # free text, or checked where it is used (env ids against envs.ENV_IDS, model ids when they resolve)

# Every flag of vldac.py's Args that takes a number, a path or text. A flag missing here fails the test that
# derives its cases from this table; bool and Literal flags need none (tyro refuses anything else).
TRAIN = dict(
    exp_name=TEXT, seed=SEED, save_dir=PathTo("dir"), trajectories_every=OFF_OR_COUNT, eval_episodes=OFF_OR_COUNT,
    threads=OFF_OR_COUNT, checkpoint_every=OFF_OR_COUNT, resume=PathTo("run"), wandb_project_name=TEXT,
    wandb_entity=TEXT, env_id=TEXT, num_frames=COUNT, frame_size=COUNT, invalid_action_penalty=Range(),
    reward_shaping=at_least(0.0), model_id=TEXT, lora_r=at_least(0), lora_alpha=above(0),
    lora_dropout=Range(0.0, 1.0, high_open=True), temperature=above(0.0), max_new_tokens=COUNT, total_timesteps=COUNT,
    num_envs=COUNT, num_steps=COUNT, learning_rate=above(0.0), end_learning_rate=at_least(0.0), gamma=UNIT,
    gae_lambda=UNIT, update_epochs=COUNT, minibatch_size=COUNT, micro_batch_size=COUNT, clip_coef=above(0.0),
    vf_coef=at_least(0.0), kl_beta=at_least(0.0), value_warmup_iters=at_least(0), max_grad_norm=above(0.0),
    loop_group_size=at_least(2), thought_coef=at_least(0.0))
# evaluate.py's Args: temperature 0 is greedy decoding there
EVALUATE = dict(
    model_ids=TEXT, env_ids=TEXT, seed=SEED, num_episodes=COUNT, num_envs=COUNT, temperature=at_least(0.0),
    max_new_tokens=COUNT, video_episodes=at_least(0), caption_frames=COUNT, save_trajectories=PathTo("dir"),
    output=PathTo("file"))


def check(args, table):
    """Refuse the first flag whose value lies outside its domain (None: the script fills in a default). Exit 2."""
    for name, domain in table.items():
        value = getattr(args, name)
        values = value if isinstance(value, (tuple, list)) else [value]
        for item in values if domain is not None and value is not None else []:
            if not domain.holds(item):
                shown = " ".join(map(str, values)) if isinstance(value, (tuple, list)) else value
                fail(f"--{name.replace('_', '-')} {shown} is outside its domain: {domain}")
