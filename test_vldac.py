# Tests for the VL-DAC reference implementation. Run: python -m pytest -q test_vldac.py
import ast
import dataclasses
import functools
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import types
import warnings
from functools import lru_cache
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import baselines
import checkpoint
import config
import envs
import evaluate
import flags
import rollout
import tiny_vlm
import vldac
import vlm

# ---- shared by every section: an UNTRAINED tiny Qwen2-VL built in seconds (the maths needs no model that can
# see), the pre-trained one, the helpers that build agents and run the scripts ----
HERE = Path(__file__).resolve().parent
ENV_ID = "gym_cards/NumberLine-v0"


# One thread: on a machine whose cores are shared, two OpenMP threads on these tiny matrices stall
# (measured: 30 s instead of 0.4 s for one batched generate under load). Subprocesses get the same.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Model + processor of the tiny VLM without pre-training, saved like a real checkpoint."""
    out = tmp_path_factory.mktemp("tiny_untrained")
    return tiny_vlm.build(out, tiny_vlm.TinyConfig(pretrain_steps=0), progress=False)


@pytest.fixture(scope="session")
def tiny_pretrained():
    """The real tiny model, what `--model-id tiny` loads for NumberLine: the shipped models/tiny-numberline."""
    return vlm.load_policy("tiny", "cpu")


def make_args(model_dir, **overrides):
    fields = dict(env_id=ENV_ID, model_id=str(model_dir), num_envs=2, num_steps=2, total_timesteps=4,
                  minibatch_size=4, micro_batch_size=2, max_new_tokens=6, lora_r=0)
    return config.resolve_args(vldac.Args(**{**fields, **overrides}))


def make_agent(args, seed=0):
    torch.manual_seed(seed)
    policy, processor = vlm.load_policy(args.model_id, "cpu", args.lora_r, args.lora_alpha, args.lora_dropout,
                                        bf16=args.bf16)
    return vldac.Agent(policy, rollout.Sampling(args.temperature, args.max_new_tokens), args.value_stop_grad), processor


def collect(agent, processor, args, seed=0):
    runner = rollout.EnvRunner([envs.make_env(args.env_id) for _ in range(args.num_envs)], seed)
    return runner, runner.collect(agent, processor, args.num_steps)


def gae_of(batch, args):
    return vldac.compute_gae(batch.rewards, batch.values, batch.terminated, batch.truncated, batch.bootstrap_values,
                             batch.last_values, args.gamma, args.gae_lambda)


def policy_params(agent):
    return {n: p.detach().clone() for n, p in agent.policy.named_parameters()}


BJ = "gym_cards/Blackjack-v0"  # episodes of 1-4 steps: whole episodes are cheap


# 2 envs x 5 steps x 2 iterations: NumberLine truncates at 10 steps, so every env ends an episode
SMOKE = ["--env-id", ENV_ID, "--num-envs", "2", "--num-steps", "5", "--total-timesteps", "20", "--minibatch-size", "5",
         "--micro-batch-size", "5", "--max-new-tokens", "6", "--value-warmup-iters", "1", "--save-model",
         "--eval-episodes", "2"]


TAGS = ["charts/episodic_return", "charts/success_rate", "charts/episodic_length", "charts/SPS",
        "charts/learning_rate", "charts/parse_failure_rate", "charts/response_tokens", "losses/policy_loss",
        "losses/value_loss", "losses/kl_ref", "losses/approx_kl", "losses/old_approx_kl", "losses/clipfrac",
        "losses/explained_variance", "charts/skipped_updates"]


def run_script(cwd, *flags, offline=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.update(HF_HUB_OFFLINE="1") if offline else env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, str(HERE / "vldac.py"), *flags], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ---- envs.py: the environments, their rewards, parsing and frames ----

def raw_env(env_id):
    """The registered env itself (no TextEnv), made the way check_env wants it."""
    if env_id in envs.MINIWORLD_IDS:
        envs._import_miniworld()
        return gym.make(env_id, render_mode="rgb_array", max_episode_steps=128).unwrapped
    return gym.make(env_id).unwrapped


def answer(action):
    return json.dumps({"thoughts": "test", "action": action})


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_check_env_passes(env_id):
    env = raw_env(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checker warning is a failure too
        check_env(env)
    if env_id in envs.CARD_IDS:
        assert env.observation_space == gym.spaces.Box(0, 255, (300, 300, 3), np.uint8)
    env.close()


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_check_env_passes_on_the_text_env_and_its_spec_recreates_it(env_id):
    """What envs.make_env returns passes gymnasium's checker (integer actions from its action space), and
    gym.make(env.spec) builds the same text env again (the wrappers record their constructor arguments)."""
    env = envs.make_env(env_id, num_frames=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*wrapper applied to it")  # the checker prefers raw envs
        check_env(env)
    again = gym.make(env.spec)
    assert type(again) is type(env) and again.num_frames == 2 and again.actions == env.actions
    assert again.reset(seed=3)[0].shape == env.observation_space.shape
    env.close(), again.close()


def test_pickled_text_env_is_small_and_plays_on():
    """A --resume checkpoint pickles the envs mid-episode: the observation spaces (four full-size arrays each) are
    rebuilt on load, not stored, and the unpickled env continues the same episode."""
    env = envs.make_env("gym_cards/NumberLine-v0")
    env.reset(seed=0)
    blob = pickle.dumps(env)
    assert len(blob) < 700_000, len(blob)  # the frame history (270 kB per frame) and the game; 2.4 MB with spaces
    copy = pickle.loads(blob)
    assert copy.observation_space == env.observation_space and copy.unwrapped.observation_space.shape == (300, 300, 3)
    a, b = env.step(answer("+")), copy.step(answer("+"))
    assert all(np.array_equal(x, y) for x, y in zip(a[:4], b[:4]))


def test_miniworld_creation_prints_nothing(capfd):
    envs.make_env("MiniWorld-OneRoom-v0").close()
    assert capfd.readouterr().out == ""


def test_unknown_env_id_lists_valid_ids():
    with pytest.raises(ValueError) as err:
        envs.make_env("gym_cards/Nope-v0")
    message = str(err.value)
    assert "\n" not in message and all(env_id in message for env_id in envs.ENV_IDS), message


def test_action_lists():
    assert envs.make_env("gym_cards/NumberLine-v0").actions == ["-", "+"]
    assert envs.make_env("gym_cards/Blackjack-v0").actions == ["stand", "hit"]
    assert envs.make_env("gym_cards/EZPoints-v0").actions[9:] == ["10", "+", "*", "="]
    assert envs.make_env("gym_cards/Points24-v0").actions[10:] == ["+", "-", "*", "/", "(", ")", "="]
    assert envs.MINIWORLD_ACTIONS == ["turn left", "turn right", "move forward", "move back"]


# -- NumberLine: every reward case, the reset rule, the truncation at 10 steps
def number_line(position, goal):
    env = envs.NumberLineEnv()
    env.reset(seed=0)
    env.position, env.goal = position, goal
    return env


@pytest.mark.parametrize(
    "position, goal, action, reward, terminated, new_position",
    [
        (2, 3, 1, 1.0, True, 3),  # reaches the goal
        (1, 4, 1, 0.0, False, 2),  # closer
        (2, 4, 0, -1.0, False, 1),  # farther
        (0, 3, 0, -1.0, False, 0),  # bumps the left wall: distance did not shrink
        (5, 2, 1, -1.0, False, 5),  # bumps the right wall
    ],
)
def test_number_line_rewards(position, goal, action, reward, terminated, new_position):
    env = number_line(position, goal)
    _, r, term, trunc, info = env.step(action)
    assert (r, term, trunc) == (reward, terminated, False)
    assert info == {"Target": goal, "Current": new_position}


def test_number_line_truncates_at_ten_steps():
    env = number_line(0, 5)
    for step in range(1, 11):
        _, _, term, trunc, _ = env.step(0)  # stays at the wall
        assert not term and trunc == (step == 10), step


def test_number_line_reset_never_starts_on_goal():
    env = envs.NumberLineEnv()
    for seed in range(300):
        _, info = env.reset(seed=seed)
        assert info["Target"] != info["Current"] and 0 <= info["Target"] <= 5 and 0 <= info["Current"] <= 5


def test_number_line_reset_rule_exactly():
    """Start and goal uniform in 0..5 from the seeded generator, in that order; on a tie the goal moves to
    (goal + 1) % 5, as the original (so a tie at 5 gives goal 1, never 0)."""
    env = envs.NumberLineEnv()
    ties = 0
    for seed in range(300):
        rng, _ = gym.utils.seeding.np_random(seed)
        position, goal = int(rng.integers(0, 6)), int(rng.integers(0, 6))
        if goal == position:
            goal, ties = (goal + 1) % 5, ties + 1
        _, info = env.reset(seed=seed)
        assert info == {"Target": goal, "Current": position}, (seed, info)
    assert ties > 20  # the tie rule was exercised (about 1 in 6 seeds)


def test_number_line_random_policy_success_rate():
    """Uniform random actions, 2000 seeded episodes: 0.6125 measured; 0.6113 exact (DP below). Episodes are
    short (6 steps on average) and success is common, so NumberLine is a smoke test, not a benchmark."""

    @lru_cache(maxsize=None)
    def p_success(position, goal, steps):
        if steps == 10:
            return 0.0
        total = 0.0
        for new in (max(position - 1, 0), min(position + 1, 5)):
            total += 0.5 * (1.0 if new == goal else p_success(new, goal, steps + 1))
        return total

    exact = np.mean([p_success(s, (g + 1) % 5 if g == s else g, 0) for s in range(6) for g in range(6)])
    env = envs.make_env("gym_cards/NumberLine-v0")
    successes = 0
    for seed in range(2000):
        env.reset(seed=seed)
        while True:  # unparsable answers: the env plays a uniformly random valid action
            _, _, term, trunc, info = env.step("no idea")
            assert info["parse_failed"]
            if term or trunc:
                break
        successes += info["success"]
    rate = successes / 2000
    assert abs(exact - 0.6113) < 1e-3
    assert abs(rate - exact) < 0.035, rate  # ~3 sigma at n = 2000; measured 0.6125


# -- EZPoints and Points24
def points(env_cls, numbers, formula=()):
    env = env_cls()
    env.reset(seed=0)
    env.numbers = list(numbers)
    env.cards = ["H" + envs.RANKS[n - 1] for n in numbers]
    env.used = []
    env.formula = []
    for symbol in formula:
        env.step(env.ACTIONS.index(str(symbol)))
    return env


def play(env, symbols):
    """Step each symbol; return the last step's (reward, terminated, truncated, info)."""
    for symbol in symbols:
        _, reward, term, trunc, info = env.step(env.ACTIONS.index(str(symbol)))
    return reward, term, trunc, info


@pytest.mark.parametrize(
    "env_cls, numbers, symbols, reward",
    [
        (envs.EZPointsEnv, [5, 7], [5, "+", 7, "="], 10.0),  # correct
        (envs.EZPointsEnv, [3, 4], [3, "*", 4, "="], 10.0),
        (envs.EZPointsEnv, [5, 7], [5, "*", 7, "="], -1.0),  # wrong value
        (envs.EZPointsEnv, [5, 7], [5, "+", 7, "+", "="], -1.0),  # syntax error
        (envs.EZPointsEnv, [6, 6], [6, "="], -1.0),  # "=" before both cards are used
        (envs.EZPointsEnv, [1, 2], [1, 2, "="], 10.0),  # digits concatenate: "1","2" -> 12
        (envs.Points24Env, [10, 10, 2, 2], [10, "+", 10, "+", 2, "+", 2, "="], 10.0),
        (envs.Points24Env, [8, 3, 8, 3], [8, "/", "(", 3, "-", 8, "/", 3, ")", "="], -1.0),  # 23.99999..., exact float
        (envs.Points24Env, [2, 4, 1, 1], [2, 4, "*", 1, "*", 1, "="], 10.0),  # "24*1*1"
        (envs.Points24Env, [2, 4, 1, 1], [2, 4, "="], -1.0),  # 24, but not all four cards used
        (envs.Points24Env, [6, 1, 1, 1], [6, "/", "(", 1, "-", 1, ")", "*", 1, "="], -1.0),  # division by zero
        (envs.Points24Env, [2, 3, 3, 1], [2, "*", "*", 3, "*", 3, "*", 1, "="], 10.0),  # "**" is a power, as in Python
    ],
)
def test_formula_rewards(env_cls, numbers, symbols, reward):
    env = points(env_cls, numbers)
    r, term, trunc, info = play(env, symbols)
    assert (r, term, trunc) == (reward, True, False)
    assert set(info) == {"Cards", "Numbers", "Formula"}
    assert "=" not in info["Formula"]


@pytest.mark.parametrize("env_cls", [envs.EZPointsEnv, envs.Points24Env])
def test_card_used_twice(env_cls):
    env = points(env_cls, [5] + [7] * (env_cls.N_CARDS - 1), [5])
    _, r, term, trunc, info = env.step(env.ACTIONS.index("5"))
    assert (r, term, trunc) == (-1.0, False, False)
    assert info["Formula"] == [5, " "]
    _, r, *_ = env.step(env.ACTIONS.index("9"))  # a number on no card at all
    assert r == -1.0 and env.formula == [5, " ", " "]


@pytest.mark.parametrize("env_cls, limit", [(envs.EZPointsEnv, 5), (envs.Points24Env, 20)])
def test_length_guard(env_cls, limit):
    env = points(env_cls, [5] * env_cls.N_CARDS)
    for step in range(limit + 1):  # formula grows to limit + 1 symbols, all legal
        _, r, term, trunc, _ = env.step(env.ACTIONS.index("+"))
        assert (r, term, trunc) == (0.0, False, False), step
    before = list(env.formula)
    _, r, term, trunc, info = env.step(env.ACTIONS.index("="))  # ignored: too long
    assert (r, term, trunc) == (-1.0, False, True)
    assert info["Formula"] == before == ["+"] * (limit + 1)


def test_ez_points_deals_are_solvable():
    env = envs.EZPointsEnv()
    for seed in range(300):
        _, info = env.reset(seed=seed)
        a, b = info["Numbers"]
        assert a + b == 12 or a * b == 12, info
        assert [min(envs.RANKS.index(c[1]) + 1, 10) for c in info["Cards"]] == info["Numbers"]


@pytest.mark.parametrize(
    "text, value",
    [("24", 24), ("2+2*5", 12), ("(2+2)*6", 24), ("3/2", 1.5), ("-2**2", -4), ("2**3**2", 512), ("2**-1", 0.5),
     (" 5+7", 12), ("7//2", 3), ("5--7", 12), ("+-+3", -3)],
)
def test_calc_values(text, value):
    assert envs.calc(text) == value and type(envs.calc(text)) is type(value)


@pytest.mark.parametrize("text", ["", "1 0", "3(4)", "(3", "3)", "()", "2* *3", "1/0", "5+", "x", "1_0", "2e3",
                                  "10**10**10**10", "__import__('os')"])
def test_calc_rejects(text):
    with pytest.raises((ValueError, ArithmeticError)):
        envs.calc(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([str(n) for n in range(1, 11)] + list("+-*/() ")), max_size=12))
def test_calc_matches_python_arithmetic(symbols):
    """Differential test against Python's own evaluator, the original's semantics. Safe here: the
    strings are built only from digits, + - * / ( ) and spaces."""
    text = "".join(symbols)
    try:
        ours = ("ok", envs.calc(text))
    except OverflowError:
        return  # our guard against astronomically large powers; Python would take forever
    except (ValueError, ArithmeticError):
        ours = ("error",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "3(4)": SyntaxWarning, then TypeError
        try:
            value = eval(text, {"__builtins__": {}})  # the original's call (strips leading spaces)
            python = ("ok", value) if not isinstance(value, tuple) else ("error",)  # "()" is a tuple
        except Exception:
            python = ("error",)
    assert repr(ours) == repr(python), text


# -- Blackjack
def blackjack(dealer, player):
    """Hands as rank codes, e.g. ("K", "7")."""
    env = envs.BlackjackEnv()
    env.reset(seed=0)
    card = lambda rank: (min(envs.RANKS.index(rank) + 1, 10), rank, "S")  # noqa: E731
    env.dealer, env.player = [card(r) for r in dealer], [card(r) for r in player]
    return env


def test_blackjack_bust():
    env = blackjack("K7", "KQA")  # 21 with the ace as 1: any card busts
    _, r, term, trunc, info = env.step(1)
    assert (r, term, trunc) == (-1.0, True, False) and len(info["Player Card"]) == 4


def test_blackjack_hit_without_bust():
    env = blackjack("K7", "23")
    _, r, term, _, _ = env.step(1)
    assert (r, term) == (0.0, False) and len(env.player) == 3


@pytest.mark.parametrize("dealer, player, reward", [("K7", "KQ", 1.0), ("KQ", "K7", -1.0), ("K8", "K8", 0.0),
                                                    ("A6", "K7", 0.0)])  # soft 17: dealer stands
def test_blackjack_stand(dealer, player, reward):
    env = blackjack(dealer, player)
    _, r, term, trunc, info = env.step(0)
    assert (r, term, trunc) == (reward, True, False) and len(info["Dealer Card"]) == 2


@pytest.mark.parametrize("seed", range(20))
def test_blackjack_dealer_draws_to_17(seed):
    env = blackjack("K6", "K9")  # dealer 16 must draw
    env.np_random, _ = gym.utils.seeding.np_random(seed)
    _, r, term, _, _ = env.step(0)
    dealer = envs.sum_hand(env.dealer)
    assert term and len(env.dealer) >= 3 and dealer >= 17
    assert all(envs.sum_hand(env.dealer[:k]) < 17 for k in range(2, len(env.dealer)))
    assert r == (1.0 if dealer > 21 or dealer < 19 else 0.0 if dealer == 19 else -1.0)


def test_perfect_perception_captions_and_target_window():
    """benchmarks/perfect_perception.py: its table has a row for every caption the MiniWorld envs produce (a random
    walk through each), and the env step it reports for the target is where the last 30 ended episodes first
    succeed at the target rate (a hand-built record)."""
    sys.path.insert(0, str(HERE / "benchmarks"))
    import perfect_perception as pp

    seen, rng = set(), np.random.default_rng(0)
    for env_id in envs.MINIWORLD_IDS:
        env = envs.make_env(env_id)
        env.reset(seed=0)
        for _ in range(300):
            seen.add(env.state_text())
            if any(env.step(int(rng.integers(4)))[2:4]):
                env.reset(seed=int(rng.integers(1000)))
    assert seen <= set(pp.CAPTIONS) and len(seen) >= 6, seen - set(pp.CAPTIONS)
    ends = [(10 * i, i >= 10) for i in range(1, 61)]  # episode i ends at step 10 i; 1-9 lost, the rest won
    # the window of 30 ending at episode i holds max(0, 39 - i) losses: 26 / 30 >= 0.85 first at i = 35
    assert pp.first_reach(ends, 0.85) == 10 * 35 and pp.first_reach(ends[:34], 0.85) is None
    assert pp.first_reach(ends, 0.5) == 10 * 30


def test_blackjack_exact_returns_match_our_env():
    """benchmarks/learning.py's exact expected returns (basic strategy, random hit/stand) agree with 6,000 hands
    of BlackjackEnv played by the same policies (within 4 standard errors, about 0.05)."""
    sys.path.insert(0, str(HERE / "benchmarks"))
    import learning

    env, rng = envs.BlackjackEnv(), np.random.default_rng(0)

    def best(hand, up):  # the recursion's decision for this hand
        hard, ace = sum(c[0] for c in hand), any(c[0] == 1 for c in hand)
        return int(learning._hit(hard, ace, up, None) > learning._stand(learning._total(hard, ace), up))

    for p_hit, expected in [(None, learning.blackjack_return()), (0.5, learning.blackjack_return(0.5))]:
        total = 0.0
        for hand in range(6_000):
            env.reset(seed=hand)
            done = False
            while not done:
                action = best(env.player, env.dealer[0][0]) if p_hit is None else int(rng.random() < p_hit)
                _, reward, done, _, _ = env.step(action)
            total += reward
        assert abs(total / 6_000 - expected) < 4 * 0.95 / math.sqrt(6_000), (p_hit, total / 6_000, expected)
    assert -0.06 < learning.blackjack_return() < -0.03 and learning.blackjack_return(0.5) < -0.3


def test_blackjack_state_text_and_many_cards_render():
    env = blackjack("T7", "AA2A3")
    assert env.state_text() == "Dealer: 10. Player: A, A, 2, A, 3."
    assert env.render().shape == (300, 300, 3)


# -- Parsing
NL = ["-", "+"]

MW = envs.MINIWORLD_ACTIONS

P24 = [str(n) for n in range(1, 11)] + ["+", "-", "*", "/", "(", ")", "="]


@pytest.mark.parametrize(
    "text, actions, expected",
    [
        ('{"thoughts": "go right", "action": "+"}', NL, 1),
        ('Sure! Here it is: {"thoughts": "left", "action": "-"} Hope that helps.', NL, 0),  # extra text
        ("```json\n{\"thoughts\": \"x\", \"action\": \"-\"}\n```", NL, 0),
        ("{'thoughts': 'left', 'action': '-'}", NL, 0),  # single quotes
        ("{'thoughts': 'the action: + is bad', 'action': '-'}", NL, 0),
        ('{"thoughts": "go right", "action": "+"', NL, 1),  # missing closing brace
        ('{"thoughts": "go right", "action": +}', NL, 1),  # unquoted value
        ('{"action": "+"}', NL, 1),  # no thoughts: fine
        ('{"thoughts": "x", "action": "  HIT "}', ["stand", "hit"], 1),
        ("+", NL, 1),  # a bare action name
        ('{"thoughts": "x", "action": "10"}', P24, 9),
        ('{"thoughts": "x", "action": 10}', P24, 9),
        ('{"thoughts": "x", "action": "("}', P24, 14),
        ('{"thoughts": "x", "action": 2}', MW, 2),  # MiniWorld: the index
        ('{"thoughts": "x", "action": "3"}', MW, 3),
        ('{"thoughts": "x", "action": "move forward"}', MW, 2),
        ('{"thoughts": "x", "action": "1: turn right"}', MW, 1),
        ("{'thoughts': 'action: +', 'action': '-'}", NL, 0),  # near-JSON: the quoted key wins over a bare one
        ("thoughts: action = +, 'action' = '-'", NL, 0),
        ("action = '-'", NL, 0),  # "=" separates as ":" does
        ('{"thoughts": "x", action="hit"}', ["stand", "hit"], 1),
        ('{"thoughts": "x", "action": <0>}', MW, 0),
        ('{"response": {"thoughts": "x", "action": "turn left"}}', MW, 0),  # nested
        ("[" * 10_000 + '{"action": "+"}', NL, 1),
        ('{"action": "+"} and also exec("open(\'pwned\', \'w\')")', NL, 1),
    ],
)
def test_parse_valid(text, actions, expected):
    assert envs.parse_action(text, actions, np.random.default_rng(0)) == (expected, False)


HOSTILE = [
    "__import__('os').system('touch pwned')",
    '{"thoughts": "x", "action": __import__(\'os\').system(\'touch pwned\')}',
    "{'action': __import__('os').system('touch pwned') or '+'}",
    "{\"action\": \"+\"} and also exec(\"open('pwned', 'w')\")",  # a valid JSON answer: "+"
    "eval(compile('open(\"pwned\",\"w\")', 'x', 'exec'))",
    "[x for x in ().__class__.__base__.__subclasses__()]",
]


@pytest.mark.parametrize(
    "text, actions",
    [
        ('{"thoughts": "I am not sure"}', NL),  # missing action
        ('{"thoughts": "x", "action": "jump"}', NL),  # not in the list
        ('{"thoughts": "x", "action": 7}', MW),  # index out of range
        ('{"thoughts": "x", "action": 11}', P24),  # a number that is not an action name
        ('{"thoughts": "x", "action": true}', MW),
        ('{"thoughts": "x", "action": null}', NL),
        ('{"thoughts": "x", "action": ["+"]}', NL),
        ('{"thoughts": "x", "action": "2: turn left"}', MW),  # index 2 is "move forward": the name disagrees
        ('{"thoughts": "x", "action": "0: move forward"}', MW),
        ("", NL),
        ("   \n\t", NL),
        ("{" * 100_000, NL),
        ('{"a": ' * 5_000, NL),
        ("x" * 1_000_000, MW),
        ("\x00\ud800 \u202e", NL),
    ]
    + [(h, NL) for h in HOSTILE[:3] + HOSTILE[4:]],
)
def test_parse_failures_give_a_random_valid_action(text, actions, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    action, failed = envs.parse_action(text, actions, np.random.default_rng(0))
    assert failed and 0 <= action < len(actions) and isinstance(action, int)
    assert not (tmp_path / "pwned").exists()


def test_parse_failure_is_uniform_over_the_envs_actions():
    rng = np.random.default_rng(0)
    counts = np.bincount([envs.parse_action("??", P24, rng)[0] for _ in range(17_000)], minlength=17)
    assert counts.min() > 800 and counts.max() < 1200  # all 17 actions, ~1000 each (not just {0, 1})


def test_hostile_answers_through_the_env_never_execute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = envs.make_env("gym_cards/Points24-v0")
    env.reset(seed=0)
    for text in HOSTILE:
        _, _, term, trunc, info = env.step(text)
        assert 0 <= info["action"] < 17
        if term or trunc:
            env.reset()
    assert not (tmp_path / "pwned").exists()
    assert not re.search(r"\b(eval|exec)\b", Path(envs.__file__).read_text()), "no eval/exec in envs.py"


UNTRUSTED_TEXT = st.one_of(
    st.text(),
    st.text(alphabet='{}[]"\':,action +-=0123 \n\\', max_size=60),
    st.builds(lambda a, b: a + '{"action": ' + b, st.text(max_size=20), st.text(max_size=20)),
    st.builds(lambda a, h: a + h, st.text(max_size=20), st.sampled_from(HOSTILE)),
)


# every env's own action list: the four gym-cards games and MiniWorld
ALL_ACTIONS = [envs.make_env(env_id).actions for env_id in envs.CARD_IDS] + [MW]


@settings(max_examples=400, deadline=None)
@given(text=UNTRUSTED_TEXT, actions=st.sampled_from(ALL_ACTIONS))
def test_parse_fuzz_never_raises_and_is_valid(text, actions):
    action, failed = envs.parse_action(text, actions, np.random.default_rng(0))
    assert isinstance(action, int) and 0 <= action < len(actions) and isinstance(failed, bool)


@lru_cache(maxsize=None)
def fuzz_env(env_id):
    env = envs.make_env(env_id)
    env.reset(seed=0)
    return env


@settings(max_examples=300, deadline=None)
@given(text=UNTRUSTED_TEXT, env_id=st.sampled_from(envs.CARD_IDS))
def test_env_step_fuzz_never_raises_and_plays_a_valid_action(text, env_id):
    env = fuzz_env(env_id)
    _, reward, terminated, truncated, info = env.step(text)
    assert 0 <= info["action"] < len(env.actions) and math.isfinite(reward)
    if terminated or truncated:
        env.reset()


def test_invalid_action_penalty_and_info():
    env = envs.make_env("gym_cards/NumberLine-v0", invalid_action_penalty=-0.5)
    env.reset(seed=0)
    env.unwrapped.position, env.unwrapped.goal = 2, 4
    _, r, _, _, info = env.step(answer("+"))
    assert (r, info["action"], info["parse_failed"], info["success"]) == (0.0, 1, False, False)
    _, r, _, _, info = env.step("gibberish")
    assert info["parse_failed"] and info["action"] in (0, 1)
    assert r == {0: -1.0, 1: 1.0}[info["action"]] - 0.5


def test_miniworld_shaping_pays_the_potential_difference_and_keeps_the_reward():
    """Shaping adds Phi(s') - Phi(s) to the paper's reward and nothing else: the same seed and actions give the
    same frames, success and sparse reward, and the added amounts sum to Phi(last) - Phi(first), computed here
    from the simulator's positions, not through envs' own potential."""
    plain, shaped = envs.make_env("MiniWorld-OneRoom-v0"), envs.make_env("MiniWorld-OneRoom-v0", shaping=0.3)
    world = shaped.env.unwrapped

    def phi():
        offset = world.box.pos[[0, 2]] - world.agent.pos[[0, 2]]
        heading = math.degrees(math.atan2(offset @ world.agent.right_vec[[0, 2]], offset @ world.agent.dir_vec[[0, 2]]))
        return -0.3 * (math.hypot(*offset) + abs(heading) / 100)

    for env in (plain, shaped):
        env.reset(seed=5)
    first, added, rng = phi(), [], np.random.default_rng(0)
    for _ in range(60):
        action = int(rng.integers(4))
        before = phi()
        a, b = plain.step(action), shaped.step(action)
        assert np.array_equal(a[0], b[0]) and a[2:4] == b[2:4] and a[4]["success"] == b[4]["success"]
        added.append(b[1] - a[1])
        assert added[-1] == pytest.approx(phi() - before, abs=1e-9)
        if a[2] or a[3]:
            break
    assert sum(added) == pytest.approx(phi() - first, abs=1e-9) and max(map(abs, added)) > 0.01
    with pytest.raises(ValueError, match="MiniWorld only"):
        envs.make_env("gym_cards/NumberLine-v0", shaping=0.3)
    plain.close(), shaped.close()


# -- Frames, prompts, seeding
def test_prompt_and_text_observation():
    env = envs.make_env("gym_cards/EZPoints-v0")
    env.reset(seed=1)
    env.step(answer(str(env.unwrapped.numbers[0])))
    prompt = env.prompt()
    assert "12" in prompt and '"action"' in prompt and "Text observation" not in prompt and "<image>" not in prompt
    assert "".join(map(str, env.unwrapped.formula)) in prompt
    env = envs.make_env("gym_cards/NumberLine-v0", text_obs=True)
    _, info = env.reset(seed=1)
    assert env.state_text() == f"Target: {info['Target']}, Current: {info['Current']}"
    assert env.prompt().endswith(env.state_text()) and "Text observation" in env.prompt()


def test_points_state_text():
    env = points(envs.EZPointsEnv, [5, 10], [5, "+"])
    env.cards = ["S5", "HQ"]
    assert env.state_text() == "Cards: 5, Q. Formula: 5 +"


def test_frame_history_resets_at_episode_boundaries():
    env = envs.make_env("gym_cards/NumberLine-v0", num_frames=3)
    frames, _ = env.reset(seed=0)
    assert frames.shape == (3, 300, 300, 3) and frames.dtype == np.uint8
    assert (frames == frames[0]).all()  # every slot is the reset frame
    env.unwrapped.position, env.unwrapped.goal = 0, 5
    f1, *_ = env.step(answer("+"))
    f2, *_ = env.step(answer("+"))
    assert (f2[:2] == f1[1:]).all() and not (f2[2] == f1[2]).all()  # oldest first, shifted by one
    frames, _ = env.reset(seed=1)
    assert (frames == frames[-1]).all()  # nothing carried over from the last episode


def run_episodes(env_id, seed, steps=40):
    env = envs.make_env(env_id)
    frames, _ = env.reset(seed=seed)
    answers = [answer(a) for a in env.actions] + ["garbage"]  # parse failures use the seeded rng
    rng = np.random.default_rng(seed)
    trace = [frames]
    for _ in range(steps):
        frames, r, term, trunc, info = env.step(answers[rng.integers(len(answers))])
        trace += [frames, r, term, trunc, info["action"]]
        if term or trunc:
            frames, _ = env.reset()
            trace.append(frames)
    env.close()
    return trace


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_same_seed_same_episode(env_id):
    a, b = run_episodes(env_id, 7), run_episodes(env_id, 7)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    c = run_episodes(env_id, 8)
    assert not (len(a) == len(c) and all(np.array_equal(x, y) for x, y in zip(a, c)))


# -- MiniWorld
def test_miniworld_frame_renders():
    env = envs.make_env("MiniWorld-OneRoom-v0")
    frames, _ = env.reset(seed=0)
    assert frames.shape == (4, 60, 80, 3) and frames.dtype == np.uint8 and frames.std() > 5
    assert (frames == frames[0]).all()
    frames, r, term, trunc, info = env.step(answer(2))
    assert info["action"] == 2 and not info["parse_failed"] and isinstance(info["success"], bool)
    env.close()
    env = envs.make_env("MiniWorld-Hallway-v0", num_frames=2, frame_size=(64, 48))
    assert env.reset(seed=0)[0].shape == (2, 48, 64, 3)
    assert "You have taken" not in env.prompt() and "3: move back" in env.prompt()
    env.step(answer(3))  # move back works although the package's action space is Discrete(3)
    assert "You have taken 1 actions" in env.prompt()
    env.close()


def test_miniworld_unsolved_episode_gets_minus_one():
    env = envs.make_env("MiniWorld-OneRoom-v0")
    env.reset(seed=0)
    for step in range(1, 129):
        _, r, term, trunc, info = env.step(answer(0))  # turning in place never reaches the box
        assert not term and trunc == (step == 128) and not info["success"]
        assert r == (-1.0 if step == 128 else 0.0)
    frames, _ = env.reset()
    assert (frames == frames[0]).all()  # the frame history starts over
    env.close()


def test_miniworld_without_gl_fails_with_one_clear_line(tmp_path):
    # No display and headless mode off: pyglet cannot get a GL context, as on a machine without EGL.
    code = "import envs; envs.make_env('MiniWorld-OneRoom-v0')"
    env = dict(os.environ, PYGLET_HEADLESS="False", DISPLAY=":12345", PYTHONPATH=str(Path(envs.__file__).parent))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith("RuntimeError: MiniWorld could not create"), result.stderr
    assert "apt-get install libegl1" in last


def place(env, agent_xz, direction_deg, box_xz):
    world = env.unwrapped
    world.agent.pos = np.array([agent_xz[0], 0.0, agent_xz[1]])
    world.agent.dir = np.radians(direction_deg)  # 0 deg looks along +x; 90 deg along -z
    world.box.pos = np.array([box_xz[0], 0.0, box_xz[1]])
    return world


def test_miniworld_success():
    env = envs.make_env("MiniWorld-OneRoom-v0")
    env.reset(seed=0)
    place(env, (4.0, 5.0), 0, (5.2, 5.0))
    _, r, term, _, info = env.step(answer(2))
    assert term and info["success"] and 0.8 < r <= 1.0  # 1 - 0.2 * step / 180
    env.close()


def red_centroid(frame):
    red = (frame[..., 0] > 120) & (frame[..., 1] < 60) & (frame[..., 2] < 60)
    return np.nonzero(red)[1].mean() / frame.shape[1] if red.sum() > 3 else None


@pytest.mark.parametrize(
    "agent, direction, box, expected, side",
    [
        ((2.0, 5.0), 0, (8.0, 5.0), "red box straight ahead, far", 0.5),
        ((2.0, 5.0), 0, (4.0, 5.0), "red box straight ahead, near", 0.5),
        ((2.0, 5.0), 20, (6.0, 5.0), "red box ahead right, mid", 0.8),  # turned left: the box is to the right
        ((2.0, 5.0), -20, (6.0, 5.0), "red box ahead left, mid", 0.2),
        ((2.0, 5.0), 180, (8.0, 5.0), "no red box in view", None),
    ],
)
def test_miniworld_state_text_matches_the_image(agent, direction, box, expected, side):
    env = envs.make_env("MiniWorld-OneRoom-v0", frame_size=(160, 120))
    env.reset(seed=0)
    world = place(env, agent, direction, box)
    assert env.state_text() == expected
    cx = red_centroid(world.render_obs())
    assert (cx is None) == (side is None) and (side is None or abs(cx - side) < 0.2), cx
    env.close()


def test_miniworld_state_text_walls_occlude():
    env = envs.make_env("MiniWorld-WallGap-v0", frame_size=(160, 120), text_obs=True)
    env.reset(seed=0)
    world = place(env, (-5.0, 4.0), 90, (-5.0, -4.0))  # facing the box, the wall in between
    assert env.state_text() == "no red box in view" and red_centroid(world.render_obs()) is None
    place(env, (0.0, 4.0), 90, (0.0, -4.0))  # the same, through the gap
    assert env.state_text() == "red box straight ahead, far" and red_centroid(world.render_obs()) is not None
    assert env.prompt().endswith("red box straight ahead, far")
    env.close()


# ---- rollout.py: prompts, generate, scoring, the env runner ----

def test_response_mask_through_first_eos():
    eos = torch.tensor([2, 7])
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 8, 9], [7, 2, 2, 0]])
    assert rollout.response_mask(ids, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("bf16,static_cache", [(False, False), (False, True), (True, True)])
def test_scoring_matches_generate(tiny_dir, bf16, static_cache):
    """The rollout's log-probs are those generate() sampled from: same positions, temperature, suppression; also
    with the static KV cache, and in bf16 autocast (the GPU's path, here on the CPU: equal up to bf16 rounding)."""
    args = make_args(tiny_dir, temperature=0.7, bf16=bf16)
    agent, processor = make_agent(args)
    agent.eval()
    env_list = [envs.make_env(ENV_ID) for _ in range(3)]
    frames = [env.reset(seed=i)[0] for i, env in enumerate(env_list)]
    inputs = rollout.prompt_inputs(processor, frames, [env.prompt() for env in env_list], "cpu")
    cache = dict(cache_implementation="static") if static_cache else {}
    with torch.no_grad():
        with rollout.compute_context(agent.policy):
            out = agent.policy.generate(**inputs, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=8,
                                        suppress_tokens=agent.suppress_token_ids, eos_token_id=agent.eos_token_ids,
                                        pad_token_id=processor.tokenizer.pad_token_id, output_scores=True,
                                        return_dict_in_generate=True, **cache)
        response_ids = out.sequences[:, inputs["input_ids"].shape[1]:]  # (B, R)
        mask = rollout.response_mask(response_ids, torch.tensor(agent.eos_token_ids))
        logprobs, _ = agent.get_logprobs_and_value(inputs, response_ids, mask)
    scores = torch.stack(out.scores, 1).float().log_softmax(-1)  # (B, R, V): processed (temperature, suppression)
    expected = scores.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    tolerance = 0.02 if bf16 else 1e-4  # bf16: the cached decoding step and the full forward round differently
    torch.testing.assert_close(logprobs[mask], expected[mask], atol=tolerance, rtol=tolerance)


def test_static_cache_decodes_as_the_dynamic_cache(tiny_pretrained):
    """--static-cache changes how the KV cache is held, not what is decoded: the same greedy answers, prompts of
    different lengths left-padded."""
    model, processor = tiny_pretrained
    env_list = [envs.make_env(ENV_ID) for _ in range(3)]
    frames = [env.reset(seed=i)[0] for i, env in enumerate(env_list)]
    prompts = [env.prompt() for env in env_list]
    prompts[1] += " Think step by step."  # a longer prompt: the others are left-padded
    inputs = rollout.prompt_inputs(processor, frames, prompts, "cpu")
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 2
    pad = processor.tokenizer.pad_token_id
    dynamic, static = (rollout.generate(model, inputs, pad, rollout.Sampling(0, 24, static_cache=s))
                       for s in (False, True))
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("bf16", [False, True])
def test_merged_lora_decodes_as_the_adapter_and_restores_the_weights(tiny_pretrained, bf16):
    """--merge-lora-rollout: inside rollout.lora_merged the model computes what the unmerged adapter computes (not
    what the base model does), greedy answers are the same (fp32), and afterwards every weight is as it was, bit
    for bit, in bf16 too, where peft's own merge / unmerge round trip rounds the base weights (why we copy)."""
    torch.manual_seed(0)
    policy, processor = vlm.load_policy("tiny", "cpu", lora_r=4, lora_alpha=8, lora_dropout=0.0, bf16=bf16)
    for name, param in policy.named_parameters():
        if "lora_B" in name:  # B starts at 0: give the adapter an effect
            param.data.normal_(0, 0.2)
    env_list = [envs.make_env(ENV_ID) for _ in range(3)]
    frames = [env.reset(seed=i)[0] for i, env in enumerate(env_list)]
    inputs = rollout.prompt_inputs(processor, frames, [env.prompt() for env in env_list], "cpu")
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}

    def logits():
        with torch.no_grad(), rollout.compute_context(policy):
            return policy(**inputs).logits[:, -1].float()  # (B, V)

    adapted = logits()
    with policy.disable_adapter():
        base = logits()
    with rollout.lora_merged(policy):
        merged = logits()
    tolerance = 0.25 if bf16 else 1e-4  # bf16: W + BA is rounded to bf16 once (logits about 4 here)
    assert (adapted - base).abs().max() > 5 * tolerance  # the adapter matters ...
    torch.testing.assert_close(merged, adapted, atol=tolerance, rtol=0)  # ... and merged computes it
    pad = processor.tokenizer.pad_token_id
    unmerged, merged = (rollout.generate(policy, inputs, pad, rollout.Sampling(0, 24, merge_lora=m))
                        for m in (False, True))
    if not bf16:
        assert torch.equal(unmerged, merged)
    after = policy.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    if bf16:
        policy.merge_adapter()
        policy.unmerge_adapter()
        assert any(not torch.equal(after[name], tensor) for name, tensor in before.items())


def test_sdpa_attention_matches_eager_with_left_padding(tiny_dir):
    """The attention kernel a GPU run uses (SDPA, transformers' default) against the reference implementation,
    on a batch with left-padded prompts and right-padded responses: the same log-probs and values."""
    args = make_args(tiny_dir)
    agent, processor = make_agent(args)
    _, batch = collect(agent, processor, args)
    inputs, response_ids, mask = rollout.collate(batch.steps[::3] + [batch.steps[1]], processor.tokenizer.pad_token_id,
                                                 "cpu")
    inputs["input_ids"] = torch.cat([torch.full_like(inputs["input_ids"][:, :5], processor.tokenizer.pad_token_id),
                                     inputs["input_ids"]], 1)  # 5 more columns of left padding on every row ...
    for key in ("attention_mask", "mm_token_type_ids"):
        inputs[key] = torch.cat([torch.zeros_like(inputs[key][:, :5]), inputs[key]], 1)
    inputs["input_ids"][0, 5:8] = processor.tokenizer.pad_token_id  # ... and 3 more on the first
    inputs["attention_mask"][0, 5:8] = 0
    results = {}
    for implementation in ("sdpa", "eager"):
        agent.policy.set_attn_implementation(implementation)
        with torch.no_grad():
            results[implementation] = agent.get_logprobs_and_value(inputs, response_ids, mask)
    assert rollout.base_model(agent.policy).config.get_text_config()._attn_implementation == "eager"
    for sdpa, eager in zip(results["sdpa"], results["eager"]):
        torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


class RecordingEnv(envs.TextEnv):
    """A TextEnv that remembers the seeds it was reset with and the state each step left it in."""

    def reset(self, *, seed=None, options=None):
        self.seeds = getattr(self, "seeds", []) + [seed]
        return super().reset(seed=seed, options=options)

    def step(self, answer):
        out = super().step(answer)
        self.last_state = (out[0], self.prompt())  # (frames, prompt) the agent would see next
        return out


def short_number_line(max_episode_steps=2):
    """NumberLine with a 2-step time limit: most episodes are truncated, some terminate."""
    return RecordingEnv(gym.wrappers.TimeLimit(envs.NumberLineEnv(), max_episode_steps), envs.NumberLineEnv.ACTIONS)


def test_rollout_bootstraps_truncation_with_the_truncated_states_value(tiny_dir):
    """A rollout long enough to truncate: where an episode is truncated (not terminated), bootstrap_value is
    V(truncated state), the state before the reset, computed here on its own; elsewhere it is 0."""
    args = make_args(tiny_dir, num_steps=5, total_timesteps=10, minibatch_size=5, micro_batch_size=5)
    agent, processor = make_agent(args)
    env_list = [short_number_line() for _ in range(2)]
    runner = rollout.EnvRunner(env_list, seed=0)
    ended_states, reset = [], runner.reset
    runner.reset = lambda i: (ended_states.append(env_list[i].last_state), reset(i))  # in (t, env) order
    batch = runner.collect(agent, processor, args.num_steps)
    done = batch.terminated | batch.truncated
    assert len(ended_states) == int(done.sum())
    bootstrapped = 0
    for (t, i), (frames, prompt) in zip(done.nonzero().tolist(), ended_states):
        if batch.terminated[t, i]:
            assert batch.bootstrap_values[t, i] == 0
            continue
        with torch.no_grad():
            expected = agent.get_value(rollout.prompt_inputs(processor, [frames], [prompt], "cpu"))[0]
        assert abs(expected) > 1e-4 and abs(batch.bootstrap_values[t, i] - expected) < 1e-5, (t, i, expected)
        bootstrapped += 1
    assert bootstrapped >= 2 and (batch.bootstrap_values[~(batch.truncated & ~batch.terminated)] == 0).all()


def test_env_runner_reset_seeds_never_repeat():
    """Env i starts from seed + i; its k-th reset uses seed + i + k * num_envs: no seed twice, in any env."""
    env_list = [short_number_line() for _ in range(3)]
    runner = rollout.EnvRunner(env_list, seed=100)
    order = np.random.default_rng(0).integers(3, size=60)
    for i in order:
        runner.reset(int(i))
    for i, env in enumerate(env_list):
        assert env.seeds == [100 + i + k * 3 for k in range(1 + (order == i).sum())], env.seeds
    seeds = [seed for env in env_list for seed in env.seeds]
    assert len(seeds) == 63 and len(set(seeds)) == 63


# ---- vldac.py: the losses and GAE, against plain computations ----

def gae_plain_loop(rewards, values, terminated, truncated, bootstrap, last_values, gamma, lam):
    """One env at a time, one step at a time, episode boundaries spelled out."""
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for e in range(N):
        carry = 0.0
        for t in reversed(range(T)):
            if terminated[t][e]:  # the episode ended: nothing after it
                next_value, carry = 0.0, 0.0
            elif truncated[t][e]:  # a time limit: the truncated state is worth its value
                next_value, carry = bootstrap[t][e], 0.0
            else:
                next_value = last_values[e] if t == T - 1 else values[t + 1][e]
            adv[t][e] = rewards[t][e] + gamma * next_value - values[t][e] + gamma * lam * carry
            carry = adv[t][e]
    return adv


@pytest.mark.parametrize("gamma, lam", [(0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    T, N = 9, 4
    rewards, values, bootstrap = (torch.randn(T, N, generator=g) for _ in range(3))
    last_values = torch.randn(N, generator=g)
    terminated = torch.zeros(T, N, dtype=torch.bool)
    truncated = torch.zeros(T, N, dtype=torch.bool)
    terminated[2, 0] = terminated[5, 1] = terminated[8, 2] = True  # 8: at the rollout's last step
    truncated[4, 0] = truncated[3, 2] = truncated[8, 3] = True
    terminated[6, 3] = truncated[6, 3] = True  # both: termination wins (no bootstrap)
    bootstrap = torch.where(truncated & ~terminated, bootstrap, torch.zeros(()))
    adv, ret = vldac.compute_gae(rewards, values, terminated, truncated, bootstrap, last_values, gamma, lam)
    expected = gae_plain_loop(rewards.tolist(), values.tolist(), terminated.tolist(), truncated.tolist(),
                              bootstrap.tolist(), last_values.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, adv + values)


def test_gae_truncation_by_hand():
    """One env: r = 1, 1 | truncated after step 0, V(truncated state) = 10, gamma = 0.5, lambda = 1."""
    values, rewards = torch.tensor([[2.0], [3.0]]), torch.tensor([[1.0], [1.0]])
    truncated = torch.tensor([[True], [False]])
    terminated = torch.tensor([[False], [True]])
    bootstrap = torch.tensor([[10.0], [0.0]])
    adv, _ = vldac.compute_gae(rewards, values, terminated, truncated, bootstrap, torch.tensor([99.0]), 0.5, 1.0)
    assert adv[:, 0].tolist() == [1 + 0.5 * 10 - 2, 1 - 3], adv  # nothing flows from step 1 into step 0


def test_policy_loss_hand_computed():
    """Two steps with 2 and 3 tokens, clip 0.2, clipping active in both; the padding token is absurd."""
    ratios = torch.tensor([[1.5, 0.9, 50.0], [0.5, 1.1, 1.0]])
    old = torch.full((2, 3), -1.0)
    new = old + ratios.log()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -2.0])
    # step 0 (A = 1):  min(1.5, 1.2) = 1.2, min(0.9, 0.9) = 0.9      -> mean 1.05
    # step 1 (A = -2): min(-1.0, -1.6) = -1.6, -2.2, -2.0             -> mean -5.8 / 3
    expected = -(1.05 + (-5.8 / 3)) / 2
    assert vldac.token_ppo_loss(new, old, adv, mask, 0.2).item() == pytest.approx(expected, abs=1e-6)
    # k3 KL: zero where equal; per step, then over steps
    ref = new.clone()
    ref[1, 0] += 1.0  # log(ref / pi) = 1 on one of step 1's three tokens
    assert vldac.kl_penalty(new, ref, mask).item() == pytest.approx((math.e - 2) / 3 / 2, abs=1e-6)


def test_masked_losses_ignore_absurd_values_at_padding():
    """A padded position holding -100 (a stored 0 against it: exp(100) overflows float32) changes nothing:
    the same losses and the same gradients as with 0 there, all finite. Masking by multiplication gives NaN."""
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    stored = torch.where(mask, -torch.rand(2, 3), torch.zeros(()))  # rollout log-probs, zero-padded by pad_stack
    adv, action_mask = torch.tensor([1.0, -2.0]), torch.tensor([[False, True, True], [False, False, True]])
    results = []
    for pad_value in (0.0, -100.0):
        logprobs = torch.where(mask, stored + 0.05 * torch.randn(2, 3, generator=torch.Generator().manual_seed(1)),
                               torch.tensor(pad_value)).requires_grad_()
        losses = [vldac.token_ppo_loss(logprobs, stored, adv, mask, 0.2), vldac.kl_penalty(logprobs, stored, mask),
                  baselines.rl4vlm_ppo_loss(logprobs, stored, adv, mask, action_mask, 0.5, 0.2)]
        grads = torch.autograd.grad(sum(losses), logprobs)[0]
        assert all(torch.isfinite(x).all() for x in (*losses, grads)), (pad_value, losses, grads)
        results.append((torch.stack(losses), grads))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert results[0][1][0, 2] == 0  # no gradient reaches the padded position
    # the step mean itself selects: an inf or NaN at a padded position stays out of it
    x = torch.tensor([[1.0, 3.0, float("inf")], [2.0, float("nan"), 4.0]])
    step_mask = torch.tensor([[True, True, False], [True, False, True]])
    assert vldac.masked_step_mean(x, step_mask).tolist() == [2.0, 3.0]


def test_value_loss_clipped_by_hand():
    values, old, returns = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, -1.0])
    # unclipped 0.5 * mean(1, 1) = 0.5; clipped (eps 0.1): max(1, (0.1 - 2)^2 = 3.61), max(1, 1)
    assert vldac.value_loss(values, old, returns).item() == pytest.approx(0.5)
    assert vldac.value_loss(values, old, returns, 0.1).item() == pytest.approx(0.5 * (3.61 + 1) / 2)


def test_cosine_learning_rate_schedule():
    """Table 6's cosine from 1e-3 to 1e-5 over 5 iterations, values by hand: lr_end + (lr - lr_end) c,
    c = (1 + cos(pi (k - 1) / 4)) / 2 = 1, 0.853553, 0.5, 0.146447, 0."""
    args = vldac.Args(learning_rate=1e-3, end_learning_rate=1e-5)
    args.num_iterations = 5
    expected = [1e-3, 1e-5 + 9.9e-4 * 0.8535534, 5.05e-4, 1e-5 + 9.9e-4 * 0.1464466, 1e-5]
    got = [vldac.cosine_learning_rate(k, args) for k in range(1, 6)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    args.num_iterations = 1
    assert vldac.cosine_learning_rate(1, args) == 1e-3  # a single iteration runs at the start value


# ---- vldac.py: the agent and the update ----

def test_agent_extends_mm_token_type_ids_only_when_given(tiny_dir):
    """collate() treats mm_token_type_ids as optional (Qwen2-VL's processor returns it, other families do not);
    the Agent agrees: it appends text marks (0) for the response when the prompt has them, else passes none."""
    agent, _ = make_agent(make_args(tiny_dir))

    class Recorder:  # stands in for the VLM: remembers the forward's arguments
        def model(self, **kwargs):
            self.kwargs = kwargs
            return types.SimpleNamespace(last_hidden_state=None)

        def parameters(self):  # no bf16 weights: no autocast (rollout.compute_context)
            return iter(())

    inputs = dict(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                  mm_token_type_ids=torch.tensor([[0, 1, 0]]))
    response_ids, token_mask = torch.tensor([[8, 9]]), torch.tensor([[True, False]])
    recorder = Recorder()
    agent._hidden(recorder, inputs, response_ids, token_mask)
    assert recorder.kwargs["mm_token_type_ids"].tolist() == [[0, 1, 0, 0, 0]]
    assert recorder.kwargs["attention_mask"].tolist() == [[1, 1, 1, 1, 0]]
    inputs.pop("mm_token_type_ids")
    agent._hidden(recorder, inputs, response_ids, token_mask)
    assert "mm_token_type_ids" not in recorder.kwargs and recorder.kwargs["input_ids"].tolist() == [[5, 6, 7, 8, 9]]


@pytest.mark.parametrize("lora_r,bf16", [(0, False), (4, False), (0, True), (4, True)])
def test_first_epoch_ratio_one_and_reference_kl_zero(tiny_dir, lora_r, bf16):
    """Re-scoring the stored steps through collate() (other padding, other batches) gives the rollout's
    log-probs and values back, and before any update the reference equals the policy (LoRA: B = 0). bf16 (the
    GPU's default, here with the CPU's autocast): bf16 weights, but the trainable ones and Adam's state fp32; its
    products are not batch-invariant where the CPU has bf16 kernels (another batch, other blocking: log-probs
    moved by up to 4e-3 on one machine), so re-scoring agrees to bf16's precision there, exactly in fp32."""
    args = make_args(tiny_dir, lora_r=lora_r, bf16=bf16)
    agent, processor = make_agent(args)
    assert isinstance(agent.policy, PeftModel) == (lora_r > 0)
    dtypes = {p.requires_grad: p.dtype for p in agent.policy.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16 if bf16 else torch.float32}
    _, batch = collect(agent, processor, args)
    tiny, tol = (1e-4, 1e-2) if bf16 else (1e-6, 1e-5)  # bf16: (log-prob error)^2 / 2 and bf16's relative error
    for index in ([0, 1, 2, 3], [3, 0], [2]):
        steps = [batch.steps[i] for i in index]
        inputs, response_ids, mask = rollout.collate(steps, processor.tokenizer.pad_token_id, "cpu")
        old = rollout.pad_stack([batch.logprobs[i] for i in index], response_ids.shape[1])
        ref = rollout.pad_stack([batch.ref_logprobs[i] for i in index], response_ids.shape[1])
        with torch.no_grad():
            logprobs, values = agent.get_logprobs_and_value(inputs, response_ids, mask)
        assert (logprobs - old)[mask].abs().max() < (1e-2 if bf16 else 1e-5)  # ratio == 1
        assert (ref - old)[mask].abs().max() < 1e-6 and vldac.kl_penalty(logprobs, ref, mask).abs() < tiny
        torch.testing.assert_close(values, batch.values.flatten()[index], atol=tol, rtol=tol)
    # the update itself: one epoch, one minibatch -> every statistic is taken before the optimizer step
    adv, ret = gae_of(batch, args)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
    args.update_epochs = 1
    stats = vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer)
    assert abs(stats["approx_kl"]) < tiny ** 1.5 and abs(stats["old_approx_kl"]) < tol and stats["clipfrac"] == 0, stats
    assert abs(stats["kl_ref"]) < tiny, stats
    assert all(v.dtype == torch.float32 for state in optimizer.state.values() for v in state.values() if v.dim())


def test_value_loss_leaves_backbone_without_gradient(tiny_dir):
    args = make_args(tiny_dir)
    agent, processor = make_agent(args)
    _, batch = collect(agent, processor, args)
    inputs, response_ids, mask = rollout.collate(batch.steps, processor.tokenizer.pad_token_id, "cpu")
    logprobs, values = agent.get_logprobs_and_value(inputs, response_ids, mask)
    vldac.value_loss(values, batch.values.flatten(), torch.randn(4)).backward()
    assert all(p.grad is None or not p.grad.any() for p in agent.policy.parameters())
    assert all(p.grad is not None and p.grad.any() for p in agent.value_head.parameters())


def test_no_stop_grad_lets_value_loss_reach_the_backbone(tiny_dir):
    """The ablation switch: without the stop-gradient the value loss trains the language model too."""
    args = make_args(tiny_dir, value_stop_grad=False)
    agent, processor = make_agent(args)
    _, batch = collect(agent, processor, args)
    inputs, response_ids, mask = rollout.collate(batch.steps, processor.tokenizer.pad_token_id, "cpu")
    _, values = agent.get_logprobs_and_value(inputs, response_ids, mask)
    vldac.value_loss(values, batch.values.flatten(), torch.randn(4)).backward()
    assert any(p.grad is not None and p.grad.any() for n, p in agent.policy.named_parameters() if "language_model" in n)


@pytest.mark.parametrize("value_stop_grad", [True, False])
def test_warmup_freezes_policy_then_update_changes_it(tiny_dir, value_stop_grad):
    """Without the stop-gradient the value loss could reach the backbone: the warm-up must still not move it."""
    args = make_args(tiny_dir, minibatch_size=2, micro_batch_size=1, value_stop_grad=value_stop_grad)
    agent, processor = make_agent(args)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3, eps=1e-5)
    runner, batch = collect(agent, processor, args)
    before, head_before = policy_params(agent), [p.detach().clone() for p in agent.value_head.parameters()]
    for _ in range(2):  # two warm-up iterations, each 2 epochs x 2 minibatches
        adv, ret = gae_of(batch, args)
        vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer, value_warmup=True)
        batch = runner.collect(agent, processor, args.num_steps)
    after = policy_params(agent)
    assert all(torch.equal(before[n], after[n]) for n in before), "warm-up moved policy parameters"
    assert any(not torch.equal(a, p) for a, p in zip(head_before, agent.value_head.parameters()))
    adv, ret = gae_of(batch, args)
    vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer)
    after = policy_params(agent)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("language_model" in n for n in changed), "a normal update left the policy unchanged"
    assert not any("visual" in n for n in changed), "the vision tower must stay frozen"


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_update_moves_logprob_with_advantage_sign(tiny_dir, advantage):
    """One env step, one plain SGD step: its tokens become more likely with A > 0, less with A < 0."""
    args = make_args(tiny_dir, num_envs=1, num_steps=1, total_timesteps=1, minibatch_size=1, micro_batch_size=1,
                     update_epochs=1, kl_beta=0.0)
    agent, processor = make_agent(args)
    _, batch = collect(agent, processor, args)
    optimizer = torch.optim.SGD([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
    adv = torch.full((1, 1), advantage)
    vldac.update(agent, optimizer, batch, adv, adv + batch.values, args, processor.tokenizer)
    inputs, response_ids, mask = rollout.collate(batch.steps, processor.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logprobs, _ = agent.eval().get_logprobs_and_value(inputs, response_ids, mask)
    change = (logprobs - batch.logprobs[0])[mask].mean().item()
    assert change * advantage > 0, change


def nudge_policy(agent, scale=0.05, seed=0):
    """Move the language model's weights away from the reference (the frozen copy made at Agent init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in agent.policy.named_parameters():
            if p.requires_grad and "language_model" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def rescore(agent, batch, pad_token_id):
    """(policy log-probs, reference log-probs, stored old log-probs, stored ref log-probs, mask) of a whole batch."""
    inputs, response_ids, mask = rollout.collate(batch.steps, pad_token_id, "cpu")
    length = response_ids.shape[1]
    with torch.no_grad():
        logprobs, _ = agent.eval().get_logprobs_and_value(inputs, response_ids, mask)
        ref = agent.get_reference_logprobs(inputs, response_ids, mask)
    return (logprobs, ref, rollout.pad_stack(batch.logprobs, length), rollout.pad_stack(batch.ref_logprobs, length),
            mask)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_reference_stays_frozen_while_the_policy_moves(tiny_dir, lora_r):
    """At initialisation policy == reference, so KL == 0 says nothing about which one the KL reads. After an
    update the policy has moved, the reference still gives the rollout's (the initial model's) log-probs,
    and kl_ref > 0."""
    args = make_args(tiny_dir, lora_r=lora_r, update_epochs=1)
    agent, processor = make_agent(args)
    _, batch = collect(agent, processor, args)
    _, ret = gae_of(batch, args)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-2)
    vldac.update(agent, optimizer, batch, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), ret, args, processor.tokenizer)
    logprobs, ref, old, ref_at_rollout, mask = rescore(agent, batch, processor.tokenizer.pad_token_id)
    assert (logprobs - old)[mask].abs().max() > 1e-3, "the update did not move the policy"
    assert (ref - ref_at_rollout)[mask].abs().max() < 1e-5, "the reference moved with the policy"
    assert vldac.kl_penalty(logprobs, ref, mask) > 1e-6


@pytest.mark.parametrize("kl_beta", [0.0, 1.0])
def test_kl_term_pulls_the_policy_back_to_the_reference(tiny_dir, kl_beta):
    """The policy moved away from the reference and every advantage 0: the KL term is the only loss that
    reaches the policy (the value loss stops at the head). beta > 0 lowers kl_ref (the sign in L = L_pol +
    beta L_KL + alpha L_val); --kl-beta 0, the ablation, leaves the policy exactly where it is."""
    args = make_args(tiny_dir, update_epochs=1, kl_beta=kl_beta)
    agent, processor = make_agent(args)
    _, batch = collect(agent, processor, args)
    nudge_policy(agent)
    logprobs, _, _, ref, mask = rescore(agent, batch, processor.tokenizer.pad_token_id)
    kl_before = vldac.kl_penalty(logprobs, ref, mask).item()
    before = policy_params(agent)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-4)  # a small step
    _, ret = gae_of(batch, args)
    vldac.update(agent, optimizer, batch, torch.zeros_like(ret), ret, args, processor.tokenizer)
    logprobs, _, _, ref, mask = rescore(agent, batch, processor.tokenizer.pad_token_id)
    kl_after = vldac.kl_penalty(logprobs, ref, mask).item()
    if kl_beta == 0:
        assert all(torch.equal(before[n], p) for n, p in agent.policy.named_parameters()), "moved without a loss"
    else:
        assert kl_before > 1e-3 and kl_after < 0.9 * kl_before, (kl_before, kl_after)


def test_stop_grad_flag_reaches_the_agent(tiny_dir):
    """make_agent (what vldac.py's main calls) hands --no-value-stop-grad to the Agent."""
    for flag in (True, False):
        agent, _ = vldac.make_agent(make_args(tiny_dir, value_stop_grad=flag), "cpu")
        assert agent.value_stop_grad is flag


def test_non_finite_loss_skips_the_step_and_is_counted(tiny_dir, monkeypatch):
    args = make_args(tiny_dir, minibatch_size=2, micro_batch_size=1)
    agent, processor = make_agent(args)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
    _, batch = collect(agent, processor, args)
    adv, ret = gae_of(batch, args)
    before = {n: p.detach().clone() for n, p in agent.named_parameters()}
    real_policy_loss = vldac.token_ppo_loss
    calls = []

    def nan_in_first_minibatch(*a, **k):  # a NaN in one micro-batch poisons its whole minibatch
        calls.append(1)
        return real_policy_loss(*a, **k) * (float("nan") if len(calls) == 1 else 1.0)

    monkeypatch.setattr(vldac, "token_ppo_loss", nan_in_first_minibatch)
    args.update_epochs = 1
    stats = vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer)
    assert stats["skipped_updates"] == 1, stats
    assert all(torch.isfinite(p).all() for p in agent.parameters())
    changed = [n for n, p in agent.named_parameters() if not torch.equal(before[n], p)]
    assert changed, "the second, finite minibatch must still update"
    monkeypatch.setattr(vldac, "token_ppo_loss", lambda *a, **k: real_policy_loss(*a, **k) * float("inf"))
    after_first = {n: p.detach().clone() for n, p in agent.named_parameters()}
    stats = vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer)
    assert stats["skipped_updates"] == 2 and all(torch.equal(after_first[n], p) for n, p in agent.named_parameters())


# ---- config.py and flags.py: the defaults and every check on the flags ----

def test_bad_inputs_one_line_exit_2(tiny_dir, capsys):
    bad = [dict(env_id="gym_cards/Nope-v0"), dict(minibatch_size=8), dict(minibatch_size=3),
           dict(micro_batch_size=3), dict(total_timesteps=2), dict(temperature=0.0), dict(num_envs=0),
           dict(num_steps=0), dict(thought_coef=-1.0), dict(threads=-1), dict(merge_lora_rollout=True),
           dict(reward_shaping=0.3), dict(env_id="MiniWorld-OneRoom-v0", reward_shaping=-0.1)]
    for overrides in bad:
        with pytest.raises(SystemExit) as exit_info:
            make_args(tiny_dir, **overrides)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, (overrides, err)
    with pytest.raises(SystemExit):
        make_args(tiny_dir, env_id="gym_cards/Nope-v0")
    err = capsys.readouterr().err
    assert all(env_id in err for env_id in envs.ENV_IDS), err
    with pytest.raises(SystemExit) as exit_info:
        vlm.load_policy(str(tiny_dir / "no-such-model"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "`tiny`" in err, err


def test_baseline_presets():
    """--baseline rl4vlm is RL4VLM as published (one ratio per step, no KL, no warm-up, no stop-gradient); --baseline
    loop has no critic and no KL; a LOOP group size that does not divide --num-envs is a one-line error."""
    rl4vlm = make_args("tiny", baseline="rl4vlm")
    assert (rl4vlm.policy_loss, rl4vlm.kl_beta, rl4vlm.value_warmup_iters, rl4vlm.value_stop_grad) == (
        "rl4vlm", 0, 0, False)
    loop = make_args("tiny", baseline="loop", num_envs=4, loop_group_size=2)
    assert (loop.policy_loss, loop.kl_beta, loop.vf_coef, loop.value_warmup_iters) == ("token", 0, 0, 0)
    vldac_args = make_args("tiny")
    assert (vldac_args.kl_beta, vldac_args.value_warmup_iters, vldac_args.value_stop_grad) == (
        config.TINY_DEFAULTS["kl_beta"], 2, True)
    with pytest.raises(SystemExit):
        make_args("tiny", baseline="loop", num_envs=4, loop_group_size=3)
    with pytest.raises(SystemExit):  # a preset's flag given another value
        make_args("tiny", baseline="rl4vlm", kl_beta=0.05)


def test_track_without_wandb_is_one_line(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None if name == "wandb" else object())
    with pytest.raises(SystemExit) as exit_info:
        make_args(tiny_dir, track=True)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "pip install wandb" in err, err


def domain_cases(name, domain, kind, tmp_path):
    """(value, inside) pairs at each bound of a flag's domain: the bound itself or the nearest number on either
    side, NaN and inf for floats; for paths, one that can be created and one under a regular file."""
    if isinstance(domain, flags.PathTo):
        (tmp_path / "a_file").write_text("x")
        (tmp_path / "a_run").mkdir(exist_ok=True)
        if domain.kind == "run":
            return [(str(tmp_path / "a_run"), True), (str(tmp_path / "no_such_run"), False)]
        return [(str(tmp_path / "new" / name), True), (str(tmp_path / "a_file" / name), False)]
    step = (lambda x, way: x + way) if kind is int else (lambda x, way: math.nextafter(x, way * math.inf))
    cases = [] if kind is int else [(math.nan, False), (math.inf, False), (-math.inf, False)]
    for bound, is_open, way in ((domain.low, domain.low_open, 1), (domain.high, domain.high_open, -1)):
        if math.isfinite(bound):
            bound = kind(bound)
            cases += [(step(bound, way), True), (step(bound, -way), False), (bound, not is_open)]
    if not (math.isfinite(domain.low) or math.isfinite(domain.high)):
        cases.append((kind(0), True))
    return cases


def flag_kind(annotation):
    """int, float, str or None (bool, Literal and derived fields have no domain) of a dataclass field's type."""
    text = str(annotation)
    if "Suppress" in text or "Literal" in text or annotation is bool or text == "typing.Optional[bool]":
        return None
    for kind in (float, int, str):
        if annotation is kind or kind.__name__ in text.replace("typing.", ""):
            return kind
    raise AssertionError(f"a flag of a type the domain test does not know: {annotation}")


@pytest.mark.parametrize("script, table", [(vldac.Args, flags.TRAIN), (evaluate.Args, flags.EVALUATE)])
def test_every_flag_has_a_domain_and_each_bound_holds(script, table, tmp_path, capsys):
    """Derived from flags.py's table, so that it cannot drift: every flag that takes a number, a path or text has a
    domain there (a new flag without one fails here), and for each bound the value just inside passes the one
    check function while the value just outside is refused in one line naming the flag, exit status 2."""
    fields = {f.name: flag_kind(f.type) for f in dataclasses.fields(script)}
    assert {name for name, kind in fields.items() if kind is not None} == set(table), "flags without a domain"
    tried = 0
    for name, domain in table.items():
        if domain is None:
            continue
        default = getattr(script(), name)
        for value, inside in domain_cases(name, domain, fields[name], tmp_path):
            given = (value,) * len(default) if isinstance(default, tuple) else value
            args = dataclasses.replace(script(), **{name: given})
            tried += 1
            if inside:
                flags.check(args, table)
                continue
            with pytest.raises(SystemExit) as exit_info:
                flags.check(args, table)
            err = capsys.readouterr().err
            flag = "--" + name.replace("_", "-")
            assert exit_info.value.code == 2 and err.count("\n") == 1 and f"{flag} " in err, (name, value, err)
    assert tried >= 2 * len([d for d in table.values() if d is not None]), tried


@pytest.mark.parametrize("script, flag, value", [("vldac.py", "--learning-rate", "-0.001"),
                                                 ("vldac.py", "--gamma", "nan"), ("vldac.py", "--frame-size", "0 60"),
                                                 ("evaluate.py", "--num-episodes", "-1")])
def test_a_bad_value_fails_before_any_work(script, flag, value, tmp_path):
    """Through the script, with an empty model cache: one line, exit 2, and nothing written or built (no run
    directory, no output, nothing in the cache)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLDAC_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(HERE / script), flag, *value.split()], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and flag in result.stderr, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == [], "a refused run left something on disk"


# ---- baselines.py: RL4VLM and LOOP ----

@pytest.mark.parametrize("thought_coef", [0.35, 1.0])
def test_rl4vlm_logprob_hand_computed(tiny_dir, thought_coef):
    """RL4VLM's step log-prob on a crafted response whose thought/action boundary is known by construction."""
    tokenizer = AutoProcessor.from_pretrained(tiny_dir).tokenizer
    thought = tokenizer('{"thoughts": "move right",')["input_ids"]
    action = tokenizer(' "action": "+"}<|im_end|>')["input_ids"]
    response_ids = torch.tensor(thought + action)  # (R,)
    action_mask = baselines.action_token_mask(tokenizer, response_ids)
    assert action_mask.tolist() == [False] * len(thought) + [True] * len(action)
    logprobs = -torch.rand(2, len(response_ids)) * 3  # (B, R), row 1 padded after 5 tokens
    token_mask = torch.ones(2, len(response_ids), dtype=torch.bool)
    token_mask[1, 5:] = False
    got = baselines.rl4vlm_logprob(logprobs, token_mask, action_mask.expand(2, -1), thought_coef)
    lp = logprobs.tolist()
    expected = [thought_coef * sum(lp[0][: len(thought)]) + sum(lp[0][len(thought):]), thought_coef * sum(lp[1][:5])]
    torch.testing.assert_close(got, torch.tensor(expected))
    if thought_coef == 1.0:
        torch.testing.assert_close(got, (logprobs * token_mask).sum(1))
    # one PPO ratio per step, on that scalar: 0.1 nats up per token over 3 tokens at lambda = 1 -> ratio e^0.3
    loss = baselines.rl4vlm_ppo_loss(torch.full((1, 3), -1.0), torch.full((1, 3), -1.1), torch.tensor([-1.0]),
                                    torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool), 1.0, 0.1)
    assert abs(loss.item() - math.exp(0.3)) < 1e-5  # A < 0: the unclipped (larger) loss wins


def test_action_split_without_field_is_all_thought(tiny_dir):
    tokenizer = AutoProcessor.from_pretrained(tiny_dir).tokenizer
    for text, first_action_char in [("I will go +", None), ('{"action" :"-"}', 1), ('xx "action":+', 3)]:
        ids = torch.tensor(tokenizer(text)["input_ids"])
        mask = baselines.action_token_mask(tokenizer, ids)
        if first_action_char is None:
            assert not mask.any()
        else:  # the first action token is the one whose decoded prefix first covers the quote
            k = int(mask.long().argmax())
            assert mask[k:].all() and len(tokenizer.decode(ids[:k])) <= first_action_char < len(
                tokenizer.decode(ids[: k + 1])), (text, mask)


def test_rl4vlm_update_first_epoch_ratio_one_then_moves_policy(tiny_dir):
    args = make_args(tiny_dir, policy_loss="rl4vlm", thought_coef=0.35, update_epochs=1)
    agent, processor = make_agent(args)
    _, batch = collect(agent, processor, args)
    before = policy_params(agent)
    adv, ret = gae_of(batch, args)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
    stats = vldac.update(agent, optimizer, batch, adv, torch.randn_like(ret), args, processor.tokenizer)
    assert stats["clipfrac"] == 0 and abs(stats["approx_kl"]) < 1e-9, stats
    after = policy_params(agent)
    assert any(not torch.equal(before[n], after[n]) for n in before if "language_model" in n)


def test_loop_advantages_hand_computed():
    """LOOP: episode i's return minus the mean of the other K - 1 returns of its group, on each of its steps."""
    returns = torch.tensor([1.0, 0.0, 0.0, -1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of K = 4
    got = baselines.loop_advantages(returns, torch.tensor([0, 0, 3, 5, 1]), 4)
    # episode 0: 1 - (0 + 0 - 1) / 3 = 4/3; episode 3: -1 - (1 + 0 + 0) / 3 = -4/3; episodes 5 and 1: 0
    assert torch.allclose(got, torch.tensor([4 / 3, 4 / 3, -4 / 3, 0.0, 0.0]))


def first_frames(batch, num_envs):
    """Each episode's first stored step's image features (the vision tower's output for its frames), (num_envs,)."""
    return [torch.cat(batch.steps[batch.episode_of_step.tolist().index(i)]["image_features"]) for i in range(num_envs)]


def test_loop_rollout_groups_episodes_by_task(tiny_dir):
    """collect_episodes: one whole episode per env; the K envs of a group start from the same task (the same
    first frame), and every step is attributed to its episode; a second rollout draws new tasks."""
    args = make_args(tiny_dir, env_id=BJ, baseline="loop", num_envs=6, loop_group_size=3, total_timesteps=12)
    agent, processor = make_agent(args)
    runner = rollout.EnvRunner([envs.make_env(BJ) for _ in range(6)], seed=0)
    tasks = []
    for _ in range(2):
        batch = runner.collect_episodes(agent, processor, 3)
        assert len(batch.episodes) == 6 and all(e is not None for e in batch.episodes)
        lengths = torch.bincount(batch.episode_of_step, minlength=6).tolist()
        assert lengths == [e["episodic_length"] for e in batch.episodes]
        assert len(batch.steps) == len(batch.logprobs) == len(batch.values) == sum(lengths)
        frames = first_frames(batch, 6)
        for group in (0, 3):
            assert torch.equal(frames[group], frames[group + 1]) and torch.equal(frames[group], frames[group + 2])
        tasks += [frames[0], frames[3]]
    assert any(not torch.equal(tasks[0], t) for t in tasks[1:]), "every group of both rollouts got the same task"


def test_loop_update_ratio_one_and_kl_zero_then_moves_policy(tiny_dir):
    """LOOP's stored steps score as the update rescores them: with the learning rate at 0 every ratio is 1 and the
    KL to the reference 0 over all its minibatches; with a learning rate, the policy moves."""
    args = make_args(tiny_dir, env_id=BJ, baseline="loop", num_envs=4, loop_group_size=2, update_epochs=1)
    agent, processor = make_agent(args)
    runner = rollout.EnvRunner([envs.make_env(BJ) for _ in range(4)], seed=0)
    batch, advantages, returns = baselines.loop_rollout(runner, agent, processor, args)
    returns_by_episode = torch.tensor([e["episodic_return"] for e in batch.episodes])
    assert torch.allclose(advantages.view(-1), baselines.loop_advantages(returns_by_episode, batch.episode_of_step, 2))
    trainable = [p for p in agent.parameters() if p.requires_grad]
    before = policy_params(agent)
    stats = vldac.update(agent, torch.optim.SGD(trainable, lr=0.0), batch, advantages, returns, args,
                         processor.tokenizer)
    assert stats["clipfrac"] == 0 and abs(stats["approx_kl"]) < 1e-9 and abs(stats["kl_ref"]) < 1e-9, stats
    assert stats["value_loss"] < 1e-9, "LOOP has no value targets: returns are the values themselves"
    advantages = advantages + torch.arange(len(advantages)) % 2 - 0.5  # never all zero (all hands may tie)
    vldac.update(agent, torch.optim.Adam(trainable, lr=1e-3), batch, advantages, returns, args, processor.tokenizer)
    after = policy_params(agent)
    assert any(not torch.equal(before[n], after[n]) for n in before if "language_model" in n)


def test_loop_training_run_stops_at_its_env_step_budget(tiny_dir, tmp_path):
    """vldac.py --baseline loop: rollouts of whole episodes until --total-timesteps env steps are taken, the
    learning rate decaying over env steps, no explained variance (no critic), the usual charts."""
    result = run_script(tmp_path, "--env-id", BJ, "--model-id", str(tiny_dir), "--baseline", "loop", "--num-envs", "4",
                        "--loop-group-size", "2", "--total-timesteps", "12", "--max-new-tokens", "6",
                        "--no-save-model", "--eval-episodes", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOOP: rollouts of 4 whole episodes" in result.stdout, result.stdout
    assert "iter 1 steps " in result.stdout and "iter 1/" not in result.stdout  # no iteration count to promise
    (run_dir,) = (tmp_path / "runs").iterdir()
    logged = scalars(run_dir)
    steps = [step for step, _ in logged["charts/episodic_return"]]
    assert steps[-2] < 12 <= steps[-1] and all(4 <= b - a for a, b in zip([0] + steps, steps)), steps
    rates = [value for _, value in logged["charts/learning_rate"]]
    assert rates == sorted(rates, reverse=True) and rates[0] == pytest.approx(3e-4), rates
    assert all(math.isnan(v) for _, v in logged["losses/explained_variance"])


@pytest.mark.parametrize("policy_loss", ["token", "rl4vlm"])
def test_policy_loss_flag_picks_the_loss(tiny_dir, policy_loss):
    """--policy-loss reaches update(): the logged policy loss is the chosen loss over the batch, not the other.
    (At ratio 1 both equal -mean(A); the policy is nudged first so they differ.)"""
    args = make_args(tiny_dir, policy_loss=policy_loss, thought_coef=0.35, update_epochs=1)
    agent, processor = make_agent(args)
    _, batch = collect(agent, processor, args)
    nudge_policy(agent)
    advantages = torch.tensor([[1.0, -0.5], [2.0, -1.5]])  # (T, N), flattened as t * N + env
    logprobs, _, old, _, mask = rescore(agent, batch, processor.tokenizer.pad_token_id)
    flat = advantages.flatten()
    action_mask = rollout.pad_stack([baselines.action_token_mask(processor.tokenizer, s["response_ids"])
                                     for s in batch.steps], mask.shape[1])
    expected = dict(token=vldac.token_ppo_loss(logprobs, old, flat, mask, args.clip_coef).item(),
                    rl4vlm=baselines.rl4vlm_ppo_loss(logprobs, old, flat, mask, action_mask, 0.35,
                                                     args.clip_coef).item())
    assert abs(expected["token"] - expected["rl4vlm"]) > 1e-4, expected
    optimizer = torch.optim.SGD([p for p in agent.parameters() if p.requires_grad], lr=0.0)
    stats = vldac.update(agent, optimizer, batch, advantages, advantages + batch.values, args, processor.tokenizer)
    assert stats["policy_loss"] == pytest.approx(expected[policy_loss], abs=1e-5), (stats, expected)


# ---- checkpoint.py: save, resume, signals, run directories ----

def test_lora_update_save_and_reload(tiny_dir, tmp_path):
    """LoRA: an update moves the adapter only; the saved directory reloads (ours and from_pretrained)."""
    args = make_args(tiny_dir, lora_r=4, minibatch_size=2, micro_batch_size=1)
    agent, processor = make_agent(args)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
    _, batch = collect(agent, processor, args)
    before = policy_params(agent)
    adv, ret = gae_of(batch, args)
    stats = vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer)
    assert all(np.isfinite(v) for v in stats.values()), stats
    after = policy_params(agent)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed), changed
    checkpoint.save_model(tmp_path / "model", agent, processor, args)
    policy, _ = vlm.load_policy(str(tmp_path / "model"))
    assert isinstance(policy, PeftModel)
    reloaded = dict(policy.named_parameters())
    assert all(torch.equal(after[n], reloaded[n]) for n in changed)
    head = vldac.Agent(policy).value_head
    head.load_state_dict(torch.load(tmp_path / "model" / "value_head.pt"))
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), agent.value_head.parameters()))
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "model") is not None
    assert json.loads((tmp_path / "model" / "args.json").read_text())["lora_r"] == 4


# 2 envs x 5 steps x 6 iterations, a checkpoint after every update
RESUMABLE = [*SMOKE[: SMOKE.index("--value-warmup-iters")], "--total-timesteps", "60", "--checkpoint-every", "1",
             "--seed", "5", "--eval-episodes", "0"]


def test_kill_9_then_resume_continues_exactly(tiny_dir, tmp_path):
    """SIGKILL mid-run, --resume: no missing or duplicated logged step, the same metrics and final weights
    as an uninterrupted run (bit-identical on CPU: weights, Adam, RNG states and envs are all restored)."""
    flags = [*RESUMABLE, "--model-id", str(tiny_dir)]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    result = run_script(tmp_path / "a", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(HERE / "vldac.py"), *flags], cwd=tmp_path / "b", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # iteration 1's checkpoint is complete before iteration 2 is printed
        if line.startswith("iter 3/"):
            proc.kill()  # SIGKILL, during iteration 3's checkpoint or iteration 4's rollout
            break
    proc.wait()
    assert proc.returncode == -9
    (run_b,) = (tmp_path / "b" / "runs").iterdir()
    killed = torch.load(run_b / "checkpoint.pt", weights_only=False)
    assert 2 <= killed["iteration"] <= 3 and killed["global_step"] == 10 * killed["iteration"]
    result = run_script(tmp_path / "b", "--resume", str(run_b))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"after iteration {killed['iteration']}" in result.stdout
    assert result.stdout.count("iter ") == 6 - killed["iteration"], result.stdout
    (run_a,) = (tmp_path / "a" / "runs").iterdir()
    uninterrupted, resumed = scalars(run_a), scalars(run_b)
    for tag in set(uninterrupted) - {"charts/SPS"}:
        assert [step for step, _ in resumed[tag]] == [10, 20, 30, 40, 50, 60], (tag, resumed[tag])
        np.testing.assert_allclose([v for _, v in resumed[tag]], [v for _, v in uninterrupted[tag]], rtol=1e-6,
                                   err_msg=tag)
    final_a, final_b = (torch.load(r / "checkpoint.pt", weights_only=False)["trainable"] for r in (run_a, run_b))
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[n], final_b[n]) for n in final_a)
    assert not (run_b / "checkpoint.pt.tmp").exists()


def test_ablation_run_cut_off_continues_from_its_checkpoint(tiny_dir, tmp_path, monkeypatch):
    """benchmarks/ablations.py's run_one: a run killed mid-way (the end of a session) is resumed by the next
    invocation from its checkpoint, not redone; its result logs each step once and counts both launches' time; a
    finished run is then reused as it is."""
    sys.path.insert(0, str(HERE / "benchmarks"))
    import ablations

    run_dir = tmp_path / "cell"
    cmd = [sys.executable, str(HERE / "vldac.py"), *RESUMABLE, "--model-id", str(tiny_dir), "--save-model",
           "--save-dir", str(run_dir / "model")]
    monkeypatch.setattr(ablations, "run_paths", lambda *job: (run_dir, cmd))
    monkeypatch.setattr(ablations, "run_probe", lambda model, env_id: 0.5)
    launches = []

    def launch(command, cwd, env, stdout, stderr):  # the first launch is killed after iteration 3's log line
        launches.append(command)
        if len(launches) > 1:
            return subprocess.run(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        for line in proc.stdout:
            stdout.write(line)
            if line.startswith("iter 3/"):
                proc.kill()
                break
        return subprocess.CompletedProcess(command, proc.wait())

    monkeypatch.setattr(ablations, "subprocess", types.SimpleNamespace(run=launch, STDOUT=subprocess.STDOUT))
    assert ablations.run_one(tmp_path, ENV_ID, "vldac", 5, 60) is None  # killed: no result
    assert (run_dir / "attempt.json").exists() and list(run_dir.glob("runs/*/checkpoint.pt"))
    result = ablations.run_one(tmp_path, ENV_ID, "vldac", 5, 60)
    assert launches[1][-2:] == ["--resume", str(next(run_dir.glob("runs/*")).relative_to(run_dir))]
    assert result["launches"] == 2 and result["command"] == cmd and not (run_dir / "attempt.json").exists()
    assert result["steps"] == sorted(set(result["steps"])) and result["steps"][-1] == 60
    assert 0 < result["seconds"][-1] <= result["wall_s"] and result["seconds"] == sorted(result["seconds"])
    log = (run_dir / "train.log").read_text()
    assert log.count("iter 1/") == 1 and log.count("iter 6/") == 1 and "=== resumed from" in log
    from benchmarks import learning  # its quarters count each env step once, though the log repeats some

    assert sum(n for n, _ in learning.episode_success(run_dir)) == sum(result["episodes"])
    assert ablations.run_one(tmp_path, ENV_ID, "vldac", 5, 60) == result and len(launches) == 2


def test_ablation_archive_keeps_finished_runs_for_any_machine(tmp_path, monkeypatch):
    """benchmarks/ablations.py --archive: a finished run's small files are kept with this machine's paths written as
    placeholders, and restored into another OUT (another machine's paths), where the run counts as finished and is
    not redone; restoring never replaces a file OUT has; a restored run's model is not there, so its transfer
    evaluation is skipped, not attempted."""
    sys.path.insert(0, str(HERE / "benchmarks"))
    import ablations

    room = "MiniWorld-OneRoom-v0"
    out, archive, other = tmp_path / "out", tmp_path / "archive", tmp_path / "elsewhere" / "out"
    run_dir, cmd = ablations.run_paths(out, room, "loop", 2, 256)
    run_dir.mkdir(parents=True)
    result = dict(env_id=room, variant="loop", seed=2, command=cmd, model=ablations.tiny_model_name(room),
                  steps=[128, 256], success=[0.0, 1.0], episodes=[1, 1], wall_s=1.0, caption_after=0.5)
    (run_dir / "result.json").write_text(json.dumps(result))
    (run_dir / "transfer_sampled.json").write_text(json.dumps(dict(model=str(run_dir / "model"))))
    (run_dir / "train.log").write_text("iter 1/2\n")  # a log, a model, TensorBoard: not kept
    (out / "caption_base.json").write_text(json.dumps({room: 0.9}))
    assert ablations.sync_archive(out, archive, to_archive=True) == 3
    assert ablations.sync_archive(out, archive, to_archive=True) == 0  # nothing changed, nothing written
    kept = sorted(str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file())
    assert kept == [f"{room}/loop/seed2/result.json", f"{room}/loop/seed2/transfer_sampled.json", "caption_base.json"]
    text = (archive / kept[0]).read_text()
    assert str(tmp_path) not in text and all(f"{{{name}}}" in text for name in ("out", "root", "python"))

    other.mkdir(parents=True)
    (other / "caption_base.json").write_text(json.dumps({room: 0.1}))  # measured there: stays
    assert ablations.sync_archive(other, archive, to_archive=False) == 2
    assert json.loads((other / "caption_base.json").read_text()) == {room: 0.1}
    monkeypatch.setattr(ablations, "subprocess", None)  # a launch (training or evaluation) would raise
    restored = ablations.run_one(other, room, "loop", 2, 256)
    other_dir, other_cmd = ablations.run_paths(other, room, "loop", 2, 256)
    assert restored == {**result, "command": other_cmd} and other_cmd != cmd
    assert ablations.run_transfer(other_dir / "model", other_dir / "transfer_greedy.json", 2, 0.0) is None


def test_resume_takes_no_other_flags_and_says_when_the_run_is_finished(tmp_path, capsys):
    """Flags beside --resume would be silently ignored (the run continues with its own): refuse them. A run
    that finished has nothing left: say so and exit 0, before any model loads."""
    with pytest.raises(SystemExit) as exit_info:
        checkpoint.resume_args(vldac.Args(resume="runs/x", seed=7, total_timesteps=99))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--seed --total-timesteps" in err, err
    run = tmp_path / "run"
    run.mkdir()
    for iteration, finished in ((2, False), (3, True)):
        torch.save(dict(args=dict(num_iterations=3, seed=5), iteration=iteration, per_rank=[{}]), run / "checkpoint.pt")
        if finished:
            with pytest.raises(SystemExit) as exit_info:
                checkpoint.resume_args(vldac.Args(resume=str(run)))
            assert exit_info.value.code == 0 and "finished all 3 iterations" in capsys.readouterr().out
        else:
            args, saved = checkpoint.resume_args(vldac.Args(resume=str(run)))
            assert args.seed == 5 and args.resume == str(run) and saved["iteration"] == 2


def test_resume_errors_exit_2(tmp_path, tiny_dir, capsys):
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"half a checkpoint")
    for bad in (lambda: checkpoint.load_checkpoint(tmp_path / "not_a_run"),
                lambda: checkpoint.load_checkpoint(tmp_path / "broken"),
                lambda: make_args(tiny_dir, checkpoint_every=-1)):
        with pytest.raises(SystemExit) as exit_info:
            bad()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
    # MiniWorld without a GL context, through the script: no traceback, what to install
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYGLET_HEADLESS": "False", "DISPLAY": ":12345"}
    result = subprocess.run([sys.executable, str(HERE / "vldac.py"), "--env-id", "MiniWorld-OneRoom-v0"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "apt-get install" in result.stderr and "Traceback" not in result.stderr


# 2 envs x 5 steps per iteration, no model saved, no evaluation
SHORT_RUN = ["--env-id", ENV_ID, "--num-envs", "2", "--num-steps", "5", "--minibatch-size", "5", "--micro-batch-size",
             "5", "--max-new-tokens", "6", "--seed", "5", "--eval-episodes", "0", "--no-save-model"]


def test_two_runs_started_at_once_never_share_a_directory(tiny_dir, tmp_path):
    """A sweep starts two runs with the same name and seed in the same second: each claims its own directory
    (claim_directory's mkdir is atomic), with its own events and checkpoint."""
    claimed = [checkpoint.claim_directory(tmp_path / "runs" / "same") for _ in range(3)]
    assert [p.name for p in claimed] == ["same", "same-2", "same-3"] and all(p.is_dir() for p in claimed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    flags_ = [*SHORT_RUN, "--total-timesteps", "10", "--model-id", str(tiny_dir), "--exp-name", "sweep"]
    procs = [subprocess.Popen([sys.executable, str(HERE / "vldac.py"), *flags_], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    runs = sorted((tmp_path / "runs").glob("*__sweep__*"))
    assert len(runs) == 2, runs
    for run in runs:
        assert (run / "checkpoint.pt").is_file() and len(list(run.glob("events.out.tfevents.*"))) == 1, run


def test_ctrl_c_checkpoints_the_iteration_and_resume_finishes(tiny_dir, tmp_path):
    """SIGINT mid-run: the run finishes its iteration, writes a checkpoint (here none would be written otherwise),
    prints how to --resume in one line, exits 130 without a traceback; --resume then finishes the run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    flags_ = [*SHORT_RUN, "--total-timesteps", "60", "--checkpoint-every", "0", "--model-id", str(tiny_dir)]
    proc = subprocess.Popen([sys.executable, str(HERE / "vldac.py"), *flags_], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 2/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    run_dir = next((tmp_path / "runs").iterdir())
    assert f"--resume runs/{run_dir.name}" in err.strip().splitlines()[-1], err
    stopped = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert 2 <= stopped["iteration"] < stopped["args"]["num_iterations"], stopped["iteration"]
    result = run_script(tmp_path, "--resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"after iteration {stopped['iteration']}" in result.stdout
    assert f"iter {stopped['args']['num_iterations']}/" in result.stdout


def test_a_second_signal_while_the_checkpoint_is_written_keeps_the_previous_one(tmp_path):
    """The first Ctrl-C asks for a checkpoint; a second one while it is being written exits at once: the previous
    checkpoint stays whole and no half-written file is left beside it."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the previous checkpoint")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = checkpoint.StopOnSignal()
    agent = types.SimpleNamespace(named_parameters=lambda: [])
    optimizer = types.SimpleNamespace(state_dict=dict)
    real_save = torch.save

    def interrupted_save(state, f):  # a few bytes written, then the second Ctrl-C arrives
        f.write(b"half")
        stop.handle(signal.SIGINT, None)

    try:
        stop.handle(signal.SIGINT, None)
        assert stop.requested()
        torch.save = interrupted_save
        with pytest.raises(SystemExit) as exit_info:
            checkpoint.save_checkpoint(path, agent, optimizer, [], vldac.Args(), "run", 1, 10)
    finally:
        torch.save = real_save
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert exit_info.value.code == 130 and path.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# ---- distributed.py: torchrun over 2 gloo processes on the CPU ----

DDP_WORKER = """
import sys
import torch, torch.distributed as dist
import config, distributed, envs, rollout, vldac, vlm

tiny_dir, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
dist.init_process_group("gloo")
args = config.resolve_args(vldac.Args(env_id="gym_cards/NumberLine-v0", model_id=tiny_dir, num_envs=2, num_steps=2,
                                     total_timesteps=8, minibatch_size=4, micro_batch_size=2, max_new_tokens=6,
                                     update_epochs=1, lora_r=0))
torch.manual_seed(0)  # as vldac.py: the same seed on every rank for the initial weights
policy, processor = vlm.load_policy(tiny_dir, "cpu")
agent = vldac.Agent(policy, rollout.Sampling(args.temperature, args.max_new_tokens))
optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3, eps=1e-5)
torch.manual_seed(1 + distributed.RANK)
runner = rollout.EnvRunner([envs.make_env(args.env_id) for _ in range(2)], 1 + distributed.RANK * 10**6)
batch = runner.collect(agent, processor, args.num_steps)
adv, ret = vldac.compute_gae(batch.rewards, batch.values, batch.terminated, batch.truncated, batch.bootstrap_values,
                             batch.last_values, args.gamma, args.gae_lambda)
stats = vldac.update(agent, optimizer, batch, vldac.normalize_advantages(adv), ret, args, processor.tokenizer)
params = {n: p.detach().clone() for n, p in agent.named_parameters() if p.requires_grad}
gathered = [None, None]
dist.all_gather_object(gathered, dict(params=params, batch=batch, adv=adv, ret=ret, stats=stats))
if distributed.RANK == 0:
    torch.save(gathered, out)
dist.destroy_process_group()
"""


def torchrun(cwd, *argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *argv], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_two_ranks_equal_one_rank_over_the_union(tiny_dir, tmp_path):
    """The first update of 2 gloo ranks = one process updating on both ranks' rollouts together
    (one minibatch, one epoch: the mean gradient over 8 env steps = the mean of two 4-step means)."""
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    result = torchrun(tmp_path, "worker.py", str(tiny_dir), str(tmp_path / "out.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "out.pt", weights_only=False)
    assert all(torch.equal(rank0["params"][n], rank1["params"][n]) for n in rank0["params"])  # ranks agree
    assert rank0["batch"].rewards.shape == (2, 2)
    assert [s["input_ids"].tolist() for s in rank0["batch"].steps] != [s["input_ids"].tolist() for s in
                                                                       rank1["batch"].steps] or \
        [s["response_ids"].tolist() for s in rank0["batch"].steps] != [s["response_ids"].tolist() for s in
                                                                       rank1["batch"].steps]  # own rollouts
    # one process, 4 envs: the two rollouts side by side, env-major within each step (index t * 4 + env)
    b0, b1 = rank0["batch"], rank1["batch"]
    interleave = lambda a, b: [x for t in range(2) for x in a[t * 2:(t + 1) * 2] + b[t * 2:(t + 1) * 2]]  # noqa: E731
    union = rollout.Rollout(steps=interleave(b0.steps, b1.steps), logprobs=interleave(b0.logprobs, b1.logprobs),
                            ref_logprobs=interleave(b0.ref_logprobs, b1.ref_logprobs),
                            values=torch.cat([b0.values, b1.values], 1), rewards=None, terminated=None, truncated=None,
                            bootstrap_values=None, last_values=None, episodes=[], parse_failures=0, response_tokens=0)
    adv, ret = torch.cat([rank0["adv"], rank1["adv"]], 1), torch.cat([rank0["ret"], rank1["ret"]], 1)
    args = make_args(tiny_dir, num_envs=4, num_steps=2, total_timesteps=8, minibatch_size=8, micro_batch_size=2,
                     update_epochs=1)
    agent, processor = make_agent(args, seed=0)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3, eps=1e-5)
    stats = vldac.update(agent, optimizer, union, vldac.normalize_advantages(adv), ret, args, processor.tokenizer)
    for n, p in agent.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), rank0["params"][n], atol=2e-6, rtol=1e-5, msg=n)
    for key in ("policy_loss", "value_loss", "kl_ref"):  # rank means, averaged as vldac.py logs them
        assert abs(stats[key] - (rank0["stats"][key] + rank1["stats"][key]) / 2) < 1e-5, key


def test_torchrun_script_only_rank_0_logs_and_saves(tiny_dir, tmp_path):
    flags = [*SMOKE, "--total-timesteps", "40", "--checkpoint-every", "1", "--eval-episodes", "0",
             "--model-id", str(tiny_dir)]  # the later --total-timesteps wins
    result = torchrun(tmp_path, str(HERE / "vldac.py"), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("iter ") == 2 and "x 2 rank(s)" in result.stdout, result.stdout  # 2 x 2 x 5 steps
    (run_dir,) = (tmp_path / "runs").iterdir()
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1 and (run_dir / "model" / "value_head.pt").exists()
    assert {p.name for p in run_dir.iterdir()} == {events[0].name, "checkpoint.pt", "model"}
    assert [step for step, _ in scalars(run_dir)["losses/value_loss"]] == [20, 40]  # both ranks' env steps
    assert len(torch.load(run_dir / "checkpoint.pt", weights_only=False)["per_rank"]) == 2
    result = run_script(tmp_path, "--resume", str(run_dir))  # one process cannot continue a 2-rank run
    assert result.returncode == 2 and "2 rank(s)" in result.stderr, result.stderr


# ---- vlm.py: loading models, LoRA, other VLM families ----

def test_larger_layouts_have_the_published_sizes():
    """benchmarks/larger_model.py's 2B and 7B layouts, made on the meta device (no memory): the parameter counts
    of Qwen2-VL-2B-Instruct and Qwen2-VL-7B-Instruct, and a layout's model is born in the dtype asked for."""
    sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
    import larger_model

    processor = larger_model.processor()
    sizes = {layout: larger_model.build_model(layout, processor, "meta", torch.bfloat16) for layout in ("2b", "7b")}
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in sizes.items()} == {"2b": 2_208_985_600,
                                                                                     "7b": 8_291_375_616}
    assert {p.dtype for m in sizes.values() for p in m.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


def tiny_bpe(special, **named):
    """A byte-level BPE trained on our prompts and answers with the given special tokens, as a fast tokenizer."""
    corpus = tiny_vlm.tokenizer_corpus(tiny_vlm.StateSampler(tiny_vlm.TinyConfig().env_ids, 0))
    return tiny_vlm.train_bpe(corpus, 900, special, **named)


def tiny_text(tokenizer, eos, pad, **more):
    """The text config of every tiny family test model: 2 layers, 64 wide, 4 heads (2 KV heads)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (eos, pad)}
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, eos_token_id=ids[eos], pad_token_id=ids[pad],
                bos_token_id=ids[pad], **more)


TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)  # one ViT block


def saved(out, model, processor):
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_internvl(out):
    """A tiny random InternVL (2 Qwen2 text layers, one 28-pixel vision block, frames cut into tiles, one token per
    tile) with its own processor class and ChatML turns."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tokenizer = tiny_bpe(special, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = InternVLProcessor(image_processor=GotOcr2ImageProcessor(size={"height": 28, "width": 28}),
                                  tokenizer=tokenizer, video_processor=InternVLVideoProcessor(), image_seq_length=1,
                                  chat_template=template)
    model = InternVLForConditionalGeneration(InternVLConfig(
        vision_config=dict(**TINY_TOWER, image_size=[28, 28], patch_size=[14, 14]),
        text_config=tiny_text(tokenizer, "<|im_end|>", "<|endoftext|>", model_type="qwen2"),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5))
    return saved(out, model, processor)


def tiny_llava_onevision(out):
    """A tiny random LLaVA-OneVision (2 Qwen2 text layers, one 28-pixel SigLIP block, any-resolution crops on a
    28-pixel grid) with its own processor class and ChatML turns."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = tiny_bpe(special, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    grid = [[28, 28], [28, 56], [56, 28], [56, 56]]
    image_processor = LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, image_grid_pinpoints=grid,
                                                   crop_size={"height": 28, "width": 28})
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=4,
                                        vision_feature_select_strategy="full", chat_template=template)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config=dict(**TINY_TOWER, model_type="siglip_vision_model", image_size=28, patch_size=14),
        text_config=tiny_text(tokenizer, "<|im_end|>", "<|endoftext|>", model_type="qwen2"),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=grid))
    return saved(out, model, processor)


def tiny_smolvlm(out):
    """A tiny random SmolVLM (2 Llama text layers, one 28-pixel vision block, no image splitting) with its own
    processor class (it needs num2words) and SmolVLM's turn format."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    special = ["<|endoftext|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>", "<video>"]
    tokenizer = tiny_bpe(special, eos_token="<end_of_utterance>", pad_token="<|endoftext|>", extra_special_tokens={
        "fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
        "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>", "video_token": "<video>"})
    template = ("{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
                "{% if add_generation_prompt %}Assistant:{% endif %}")
    image_processor = SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": 28},
                                            max_image_size={"longest_edge": 28})
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=SmolVLMVideoProcessor(), image_seq_len=1, chat_template=template)
    model = SmolVLMForConditionalGeneration(SmolVLMConfig(
        vision_config=dict(**TINY_TOWER, image_size=28, patch_size=14),
        text_config=tiny_text(tokenizer, "<end_of_utterance>", "<|endoftext|>", model_type="llama"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2))
    return saved(out, model, processor)


def tiny_gemma3(out):
    """A tiny random Gemma 3 (2 text layers, one 28-pixel SigLIP block, 4 soft tokens per image) with its own
    processor class, a byte-level BPE trained on our prompts with Gemma's special tokens, and Gemma's turn format."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    special = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
               "<image_soft_token>"]
    tokenizer = tiny_bpe(special, eos_token="<end_of_turn>", pad_token="<pad>", bos_token="<bos>",
                         extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                               "image_token": "<image_soft_token>"})
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
                "m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}"
                "{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
                "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 28, "width": 28}),
                                tokenizer=tokenizer, chat_template=template, image_seq_length=4)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    model = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=tiny_text(tokenizer, "<end_of_turn>", "<pad>", head_dim=16, sliding_window=64),
        vision_config=dict(**TINY_TOWER, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"]))
    return saved(out, model, processor)


def tiny_qwen_family(out, family):
    """A tiny random Qwen2.5-VL or Qwen3-VL (2 text layers, 2 vision blocks) with the tiny model's tokenizer and the
    family's own processor class, saved like a checkpoint: what a user gets from the hub, in miniature."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    cfg = tiny_vlm.TinyConfig()
    base = tiny_vlm.build_processor(cfg, tiny_vlm.tokenizer_corpus(tiny_vlm.StateSampler(cfg.env_ids, 0)))
    tokenizer = base.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny_vlm.SPECIAL_TOKENS}
    text = tiny_text(tokenizer, "<|im_end|>", "<|endoftext|>")
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, spatial_merge_size=2,
                  temporal_patch_size=2)
    if family == "qwen2_5_vl":
        processor = Qwen2_5_VLProcessor(image_processor=base.image_processor, tokenizer=tokenizer,
                                        video_processor=base.video_processor, chat_template=base.chat_template)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                      "mrope_section": [2, 3, 3]}),
            vision_config=dict(**vision, patch_size=14, window_size=56, fullatt_block_indexes=[1]), **tokens))
    else:  # Qwen3-VL: 16-pixel patches, interleaved M-RoPE, deepstack features
        side = cfg.image_size
        image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                                size={"shortest_edge": side * side, "longest_edge": (side + 8) ** 2})
        processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     video_processor=Qwen3VLVideoProcessor(), chat_template=base.chat_template)
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
            text_config=dict(**text, head_dim=16, rope_parameters={
                "rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
            vision_config=dict(**vision, patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0]),
            **tokens))
    return saved(out, model, processor)


def test_lora_targets_on_the_published_configs():
    """The LoRA pattern on the real layouts (built on the meta device: no weights), against a count by hand from each
    config: r (in + out) for q, k, v, o, gate, up, down of every text layer, nothing in the vision tower. The
    Qwen2-VL figures are also what peft added on the GPU (benchmarks/memory_estimate.py uses these counts)."""
    sys.path.insert(0, str(HERE / "benchmarks"))
    import memory_estimate

    def by_hand(layers, hidden, q, kv, mlp):  # widths of the q / k, v / MLP projections
        return layers * 16 * (2 * (hidden + q) + 2 * (hidden + kv) + 3 * (hidden + mlp))

    expected = {"Qwen/Qwen2-VL-2B-Instruct": by_hand(28, 1536, 1536, 256, 8960),  # 18,464,768 on the H100
                "Qwen/Qwen2-VL-7B-Instruct": by_hand(28, 3584, 3584, 512, 18944),  # 40,370,176 there
                "Qwen/Qwen2.5-VL-3B-Instruct": by_hand(36, 2048, 2048, 256, 11008),
                "google/gemma-3-4b-it": by_hand(34, 2560, 8 * 256, 4 * 256, 10240)}
    for name, lora in expected.items():
        assert memory_estimate.shape(name)[1] == lora, name
    assert expected["Qwen/Qwen2-VL-2B-Instruct"] == 2_227_450_368 - 2_208_985_600


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "gemma3", "internvl", "llava_onevision", "smolvlm"])
def test_other_families_train(tmp_path, family):
    """Qwen2.5-VL, Qwen3-VL, Gemma 3 (one (3, H, W) image per frame, token_type_ids), InternVL (each frame cut into
    tiles), LLaVA-OneVision (crops, image sizes, images per row) and SmolVLM (text_model, a padded image stack) go
    through the same code, on a card game and on MiniWorld (4 frames in one prompt): a full fine-tune trains the
    language model alone; with LoRA, first-epoch ratio 1, reference KL 0, no vision token sampled, one update moves
    the adapter alone; evaluate.py plays."""
    build = dict(gemma3=tiny_gemma3, internvl=tiny_internvl, llava_onevision=tiny_llava_onevision,
                 smolvlm=tiny_smolvlm).get(family, lambda out: tiny_qwen_family(out, family))
    model_dir = build(tmp_path / family)
    policy, _ = vlm.load_policy(str(model_dir), "cpu")  # full fine-tune: the vision tower and projector frozen
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n or "text_model" in n or n.startswith("lm_head") for n in trainable)
    assert any("vision" in n or "visual" in n for n, _ in policy.named_parameters())  # there was a tower to freeze
    for env_id in (ENV_ID, "MiniWorld-OneRoom-v0"):
        args = make_args(model_dir, env_id=env_id, lora_r=4)
        agent, processor = make_agent(args)
        assert rollout.base_model(agent.policy).config.model_type == family
        assert len(agent.suppress_token_ids) == dict(gemma3=3, internvl=1, llava_onevision=2, smolvlm=1).get(family, 4)
        # the frozen vision tower runs once per step; its stored features stand in for the pixels, to the bit
        env = envs.make_env(env_id)
        frames, prompts = [list(env.reset(seed=seed)[0]) for seed in (0, 1)], [env.prompt()] * 2
        pixels = rollout.prompt_inputs(processor, frames, prompts, "cpu")
        encoded = rollout.encode_images(agent.policy, pixels)
        assert ("mm_encoder_outputs" in encoded) == (family != "qwen3_vl")  # Qwen3-VL: deepstack, keeps pixels
        base, calls = rollout.base_model(agent.policy), []
        tower = base.get_image_features

        @functools.wraps(tower)
        def counted(*a, **k):
            calls.append(1)
            return tower(*a, **k)
        with pytest.MonkeyPatch.context() as patch:  # undone even when the assertion fails
            patch.setattr(base, "get_image_features", counted)  # next step: Qwen3-VL's verdict remembered, no tower
            assert rollout.encode_images(agent.policy, pixels).keys() == encoded.keys()
        assert len(calls) == (family != "qwen3_vl"), calls
        response = torch.tensor([processor.tokenizer("turn left", add_special_tokens=False).input_ids[:3]] * 2)
        mask = torch.ones_like(response, dtype=torch.bool)
        stored, _, _ = rollout.collate(rollout.split_steps(encoded, response, mask),
                                       processor.tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            direct, kept = (agent._hidden(agent.policy, x, response, mask) for x in (pixels, stored))
        assert torch.equal(direct, kept)
        _, batch = collect(agent, processor, args)
        inputs, response_ids, mask = rollout.collate(batch.steps, processor.tokenizer.pad_token_id, "cpu")
        old, ref = (rollout.pad_stack(x, response_ids.shape[1]) for x in (batch.logprobs, batch.ref_logprobs))
        with torch.no_grad():
            logprobs, _ = agent.get_logprobs_and_value(inputs, response_ids, mask)
        assert (logprobs - old)[mask].abs().max() < 1e-5 and (ref - old)[mask].abs().max() < 1e-6
        assert not torch.isin(response_ids[mask], torch.tensor(agent.suppress_token_ids)).any()
        before = policy_params(agent)
        adv, ret = gae_of(batch, args)
        optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-2)
        vldac.update(agent, optimizer, batch, adv, ret, args, processor.tokenizer)
        moved = {n for n, p in agent.policy.named_parameters() if not torch.equal(p, before[n])}
        assert moved and all("lora_" in n for n in moved), moved
    record = evaluate.evaluate(agent.policy, processor, ENV_ID, num_episodes=2, num_envs=2, max_new_tokens=6)
    assert len(record["episodes"]) == 2 and record["length_mean"] >= 1, record  # evaluate.py plays it too


# ---- tiny_vlm.py: the offline stand-in for a pretrained checkpoint ----

def test_tiny_build_runs_with_the_callers_threads_and_records_them(monkeypatch, tmp_path):
    """A build never sets more torch threads than the caller did (two OpenMP threads beside other work stall each
    other); its card records the count, since another count builds another model."""
    seen = []
    monkeypatch.setattr(tiny_vlm, "pretrain", lambda *a, **k: seen.append(torch.get_num_threads()))
    path = tiny_vlm.build(tmp_path, tiny_vlm.TinyConfig(pretrain_steps=0), progress=False)
    assert seen == [1] and tiny_vlm.card(path)["threads"] == 1 and torch.get_num_threads() == 1


def test_every_env_has_a_shipped_tiny_model_of_its_recipe():
    """Each env's family has a model directory in models/ (what `--model-id tiny` loads, nothing built): the
    transformers files, and a card with the family's recipe, this data version, the frames it was trained on
    (drawn the same here, or the model would misread them) and the probe figures it was released with.
    All of them within 30 MB."""
    assert {tiny_vlm.family_of(e) for e in envs.ENV_IDS} == set(tiny_vlm.FAMILIES)
    for name, cfg in tiny_vlm.FAMILIES.items():
        path = tiny_vlm.shipped_path(name)
        assert tiny_vlm.tiny_model_path(name) == str(path)
        for file in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json",
                     "chat_template.jinja"):
            assert (path / file).is_file(), f"{path / file} is missing"
        card = tiny_vlm.card(path)
        assert card["config"] == json.loads(json.dumps(dataclasses.asdict(cfg))), f"{name}: not its recipe's model"
        assert card["data_version"] == tiny_vlm.DATA_VERSION
        assert card["rendering"] == tiny_vlm.rendering_key(tiny_vlm.envs_read(cfg)), f"{name}: frames differ"
        assert set(card["probe"]) == set(tiny_vlm.envs_read(cfg)), card.get("probe")
    size = sum(f.stat().st_size for f in tiny_vlm.MODELS.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"models/ holds {size / 2**20:.1f} MiB"


def test_frames_use_the_repository_font_and_a_machine_that_draws_otherwise_is_told(monkeypatch, tmp_path):
    """Labels are drawn with the font file in the repository, never one the machine may lack. A machine that draws
    the card games' frames differently (here: Pillow's built-in font) is not given a model that misreads them: one
    line with the command that builds one for its frames, which `tiny` then finds in the cache. MiniWorld, drawn
    by OpenGL rather than Pillow, adds nothing to the key."""
    assert envs.FONT.is_file() and envs._font(36).path == str(envs.FONT)
    assert tiny_vlm.rendering_key(tuple(envs.MINIWORLD_IDS)) == ""
    monkeypatch.setenv("VLDAC_CACHE", str(tmp_path))
    before = tiny_vlm.cache_path("numberline")
    from PIL import ImageFont
    monkeypatch.setattr(envs, "_font", lambda size: ImageFont.load_default(size=size))
    for cached in (envs._number_line_image, tiny_vlm.rendering_key):
        cached.cache_clear()
    try:
        with pytest.raises(tiny_vlm.FramesDiffer, match="python tiny_vlm.py --build numberline"):
            tiny_vlm.tiny_model_path("numberline")
        with pytest.raises(SystemExit) as exit_status:  # vldac.py and evaluate.py: that line, exit status 2
            vlm.resolve("tiny", "gym_cards/NumberLine-v0")
        assert exit_status.value.code == 2
        rebuilt = tiny_vlm.cache_path("numberline")
        assert rebuilt != before and rebuilt.parent == tmp_path
        rebuilt.mkdir()
        (rebuilt / "tiny_vlm.json").write_text("{}")
        assert tiny_vlm.tiny_model_path("numberline") == str(rebuilt)
    finally:
        for cached in (envs._number_line_image, tiny_vlm.rendering_key):
            cached.cache_clear()  # the next test draws with the repository's font again


def test_tiny_vlm_rebuilds_a_family_in_one_command(tmp_path):
    """`python tiny_vlm.py --build FAMILY --out DIR`: the recipe's code, cut to a few dozen steps, builds a model
    directory that loads, and prints its probe figures beside the shipped model's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(HERE / "tiny_vlm.py"), "--build", "numberline", "--steps", "24",
                             "--out", str(tmp_path), "--probe-frames", "10"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"NumberLine-v0: caption accuracy [\d.]+, parse failures [\d.]+ \(shipped: [\d.]+, [\d.]+\)",
                     result.stdout), result.stdout
    card = tiny_vlm.card(tmp_path / "tiny-numberline")
    assert card["config"]["pretrain_steps"] == 24 and card["threads"] == 1 and "probe" in card, card
    assert not list(tmp_path.glob("*.tmp*"))
    model, processor = vlm.load_policy(str(tmp_path / "tiny-numberline"), "cpu")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    bad = subprocess.run([sys.executable, str(HERE / "tiny_vlm.py"), "--build", "numberline", "--threads", "0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "--threads" in bad.stderr.strip().splitlines()[-1]


def test_state_pool_draws_every_caption_equally_often():
    """MiniWorld pre-training states: walks that head for the box half the time reach every caption, and the
    pool is sampled with each caption equally often (a random walk shows 'no red box' most of the time)."""
    sampler = tiny_vlm.StateSampler(["MiniWorld-OneRoom-v0"], seed=0, pool=600)
    [(states, weights)] = sampler.pools
    captions = sorted({s[2] for s in states})
    assert len(captions) == 10 and "red box straight ahead, near" in captions, captions
    share = {c: sum(w for s, w in zip(states, weights) if s[2] == c) for c in captions}
    assert all(abs(v - 1 / len(captions)) < 1e-9 for v in share.values()), share
    frames, prompt, caption, actions, answer = sampler.sample()
    assert len(frames) == 4 and caption in captions and actions == envs.MINIWORLD_ACTIONS


def test_card_families_learn_from_a_new_deal_each_sample():
    """The card games' pre-training batches hold as many deals as samples: a sample that walks on from the last
    one keeps its cards (a batch of 32 Points24 captions held a handful of deals, and its cards were never read)."""
    def deals(fresh):
        sampler = tiny_vlm.StateSampler(["gym_cards/Points24-v0"], seed=0, caption_formula=False, fresh_deal=fresh)
        return len({sampler.sample()[2] for _ in range(32)})

    fresh, walked_on = deals(fresh=True), deals(fresh=False)  # 32 and 4 measured
    assert fresh >= 30 and walked_on <= 12, (fresh, walked_on)
    cards = {n for n, cfg in tiny_vlm.FAMILIES.items() if cfg.fresh_deal}
    assert cards == {"ezpoints", "points24", "blackjack"}, cards
    for env_id in ("gym_cards/Points24-v0", "gym_cards/Blackjack-v0"):  # the probe's held-out states too
        assert len({s[2] for s in tiny_vlm.held_out_states(env_id, 32)}) >= 16


@pytest.mark.parametrize("turn, expected", [(0.0, 2), (0.6, 1), (-0.6, 0)])  # agent turned left of the box: turn right
def test_seek_box_heads_for_the_box(turn, expected):
    env = envs.make_env("MiniWorld-OneRoom-v0")
    env.reset(seed=0)
    world = env.unwrapped
    offset = world.box.pos - world.agent.pos
    world.agent.dir = math.atan2(-offset[2], offset[0]) + turn  # MiniWorld: dir_vec = (cos, 0, -sin)
    assert tiny_vlm.seek_box(world) == expected


def test_tiny_build_save_reload_generate(tmp_path):
    """A reduced build goes through save_pretrained and loads back through vldac's public loading path."""
    path = tiny_vlm.build(tmp_path / "tiny", tiny_vlm.TinyConfig(pretrain_steps=3, batch_size=4, format_batch_size=1),
                          progress=False)
    card = json.loads((path / "tiny_vlm.json").read_text())
    assert card["parameters"] > 100_000 and card["config"]["pretrain_steps"] == 3, card
    model, processor = vlm.load_policy(str(path), "cpu")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration", type(model)
    env = envs.make_env("gym_cards/NumberLine-v0")
    frames, _ = env.reset(seed=0)
    answers = tiny_vlm.generate_answers(model, processor, [frames], [env.prompt()], max_new_tokens=5)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_fast_pretrain_is_the_same_loss_and_builds(tmp_path):
    """TinyConfig.fast_pretrain: answer_loss (logits only where an answer token comes next) equals the model's own
    next-token loss on a caption batch and on a 4-frame task-prompt batch, and a reduced build runs with it and
    fused Adam. The card families use it; NumberLine's recipe keeps it off (its model stays the one its figures
    were measured with), and so does MiniWorld's (measured: docs/tiny_model.md)."""
    cfg = dataclasses.replace(tiny_vlm.FAMILIES["miniworld"], state_pool=30)
    sampler = tiny_vlm.sampler_of(cfg, ("MiniWorld-OneRoom-v0",), 0)
    processor = tiny_vlm.build_processor(cfg, tiny_vlm.tokenizer_corpus(sampler, n=50))
    model = tiny_vlm.build_model(cfg, processor.tokenizer)
    rng = np.random.default_rng(0)
    for examples in ([tiny_vlm.caption_example(sampler.sample()) for _ in range(4)],
                     [tiny_vlm.format_example(sampler.sample(), rng) for _ in range(2)]):
        batch = tiny_vlm.collate(processor, examples)
        assert (batch["labels"] != -100).sum() < batch["labels"].numel() / 2  # the prompts are most of a batch
        assert torch.allclose(tiny_vlm.answer_loss(model, batch), model(**batch).loss, atol=1e-5)
    assert {n for n, c in tiny_vlm.FAMILIES.items() if c.fast_pretrain} == {"ezpoints", "points24", "blackjack"}
    small = tiny_vlm.TinyConfig(pretrain_steps=2, batch_size=2, format_batch_size=1, fast_pretrain=True)
    assert json.loads((tiny_vlm.build(tmp_path, small, progress=False) / "tiny_vlm.json").read_text())[
        "config"]["fast_pretrain"]


def test_processor_expands_image_tokens_for_the_model(tiny_dir):
    """One <|image_pad|> per merged 28x28 patch: what the model's vision tower will produce."""
    model, processor = vlm.load_policy(str(tiny_dir), "cpu")
    for env_id, frames_per_prompt in [("gym_cards/NumberLine-v0", 1), ("MiniWorld-OneRoom-v0", 4)]:
        env = envs.make_env(env_id)
        frames, _ = env.reset(seed=0)
        inputs = rollout.prompt_inputs(processor, [frames], [env.prompt()], "cpu")
        grid = inputs["image_grid_thw"]  # (K, 3): temporal, height, width patches
        assert grid.shape[0] == frames_per_prompt
        expected = int(grid.prod(-1).sum()) // model.config.vision_config.spatial_merge_size**2
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == expected
        assert int((inputs["mm_token_type_ids"] == 1).sum()) == expected
    assert grid[0].tolist() == [1, 8, 10], "MiniWorld 80x60 frames should become 112x140 (8x10 patches)"


def test_pretraining_teaches_the_format_not_a_policy(tiny_pretrained):
    """The pre-trained model answers in the JSON format, and its action does not follow the state:
    the pre-training data had uniformly random actions, so RL starts from (roughly) a random policy."""
    model, processor = tiny_pretrained
    env = envs.make_env("gym_cards/NumberLine-v0")
    states, correct_moves, parsed = [], 0, 0
    for seed in range(40):
        frames, info = env.reset(seed=seed)
        states.append((frames, env.prompt(), info))
    answers = tiny_vlm.generate_answers(model, processor, [s[0] for s in states], [s[1] for s in states], 40)
    for answer, (_, _, info) in zip(answers, states):
        action, failed = envs.parse_action(answer, env.actions, np.random.default_rng(0))
        parsed += not failed
        correct_moves += action == int(info["Target"] > info["Current"])
    assert parsed >= 36, f"only {parsed}/40 answers parsed: {answers[:3]}"
    assert correct_moves <= 32, f"greedy actions already right {correct_moves}/40 times: pre-training leaked a policy"


@pytest.fixture(scope="session")
def tiny_families():
    """Every family's shipped model, what `--model-id tiny` loads for its envs: family -> (model, processor),
    loaded lazily."""
    return lru_cache(maxsize=None)(lambda name: vlm.load_policy(tiny_vlm.tiny_model_path(name)))


# The goals each env's tiny model was built to (docs/tiny_model.md): a shipped model's figures must meet them.
READS = {"gym_cards/NumberLine-v0": 0.95, "gym_cards/EZPoints-v0": 0.95, "gym_cards/Points24-v0": 0.95,
         "gym_cards/Blackjack-v0": 0.95, "MiniWorld-OneRoom-v0": 0.9, "MiniWorld-Hallway-v0": 0.9,
         "MiniWorld-FourRooms-v0": 0.9, "MiniWorld-WallGap-v0": 0.9}


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_shipped_tiny_model_reads_its_env_as_it_shipped(tiny_families, env_id):
    """Each env's shipped model, re-probed here on 100 of the held-out frames and prompts its card's figures came
    from: caption accuracy no more than 3 binomial standard errors below the figure it shipped with, and at most
    5% unparsable answers at temperature 1 (as in a rollout) before any RL."""
    family = tiny_vlm.family_of(env_id)
    shipped = tiny_vlm.card(tiny_vlm.shipped_path(family))["probe"][env_id]
    assert shipped["caption_accuracy"] >= READS[env_id] and shipped["parse_failures"] <= 0.05, shipped
    model, processor = tiny_families(family)
    failures = tiny_vlm.parse_failure_rate(model, processor, env_id, num_prompts=100)
    assert failures <= 0.05, f"{env_id}: {failures:.2f} of the answers at temperature 1 do not parse"
    accuracy, p = tiny_vlm.caption_accuracy(model, processor, env_id, num_frames=100), shipped["caption_accuracy"]
    assert accuracy >= p - 3 * math.sqrt(max(p * (1 - p), 0.01) / 100), f"{env_id}: {accuracy:.2f}, shipped {p:.3f}"


def test_miniworld_model_tells_columns_apart(tiny_families):
    """The M-RoPE positions the MiniWorld model gives the newest frame of a real prompt: one row's image tokens
    differ in width alone, and its rotary embedding turns neighbouring columns by >= 0.3 rad on some rotary pair.
    With Qwen2-VL's split at theta 1e4 the width pairs are the slowest: < 0.013 rad, left and right alike."""
    model, processor = tiny_families("miniworld")
    env = envs.make_env("MiniWorld-OneRoom-v0")
    frames, _ = env.reset(seed=0)
    batch = rollout.prompt_inputs(processor, [frames], [env.prompt()], "cpu")
    positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                              attention_mask=batch["attention_mask"])  # (3, 1, P)
    _, height, width = (batch["image_grid_thw"][-1] // 2).tolist()  # merged tokens of the newest frame
    newest = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten()[-height * width:]
    t, h, w = positions[:, 0, newest[:width]]  # the first row, left to right
    assert (t == t[0]).all() and (h == h[0]).all() and (w.diff() == 1).all(), positions[:, 0, newest]
    cos, sin = model.model.language_model.rotary_emb(torch.zeros(1), positions[:, :, newest[:2]])  # (1, 2, head_dim)
    angles = torch.atan2(sin[0], cos[0])  # (2, head_dim): columns 0 and 1
    turn = torch.remainder(angles[1] - angles[0] + math.pi, 2 * math.pi) - math.pi
    assert turn.abs().max() >= 0.3, f"neighbouring columns turned by at most {turn.abs().max():.4f} rad"


def test_value_head_input_holds_the_scene(tiny_families):
    """The state VL-DAC's value head reads (last layer, last prompt token) holds the MiniWorld scene: a linear
    read-out names the caption of 100 held-out OneRoom states >= 75% of the time (0.81 measured; 0.69 with the
    earlier model that could not tell left from right; chance about 0.1)."""
    model, processor = tiny_families("miniworld")
    accuracy = tiny_vlm.state_readout_accuracy(model, processor, "MiniWorld-OneRoom-v0")
    assert accuracy >= 0.75, f"a linear read-out of the value head's input names {accuracy:.2f} of the captions"


def test_miniworld_model_sees_and_its_prior_is_only_a_hint(tiny_families):
    """The MiniWorld model describes the box, and its greedy actions head for it (seek_box) more often than random
    actions would (1 in 4: the weak prior; 42 of 60 measured) but not always (not a solved policy; how weak the
    prior is at temperature 1, as a rollout samples: test_shipped_prior_is_weak_and_as_measured)."""
    model, processor = tiny_families("miniworld")
    env, rng, states, seen = envs.make_env("MiniWorld-OneRoom-v0"), np.random.default_rng(0), [], 0
    for seed in range(60):  # states on the way to the box, as in pre-training, with the action that heads for it
        frames, _ = env.reset(seed=seed)
        for _ in range(int(rng.integers(0, 20))):
            frames, _, terminated, _, _ = env.step(tiny_vlm.seek_box(env.unwrapped) if rng.random() < 0.5
                                                   else int(rng.integers(4)))
            if terminated:
                frames, _ = env.reset(seed=1000 + seed)
        states.append((frames, env.prompt(), tiny_vlm.seek_box(env.unwrapped)))
        seen += env.state_text() != "no red box in view"
    answers = tiny_vlm.generate_answers(model, processor, [s[0] for s in states], [s[1] for s in states], 40)
    actions = [envs.parse_action(a, env.actions, np.random.default_rng(0)) for a in answers]
    assert sum(failed for _, failed in actions) <= 3, answers[:3]
    agree = sum(action == state[2] for (action, _), state in zip(actions, states))
    assert seen >= 20 and 20 <= agree <= 54, f"greedy actions head for the box {agree}/60 times"


# -- tiny model prior (tiny_vlm.PriorConfig: MiniWorld's and EZPoints' models start with a weak, measured hint)


def test_miniworld_expert_reaches_the_box():
    """envs.miniworld_expert, followed every step, reaches OneRoom's red box (50 of 50 measured, 36 steps on
    average), and its action is a function of the caption: turn left unseen, forward straight ahead, else towards."""
    env, wins = envs.make_env("MiniWorld-OneRoom-v0"), 0
    want = {"no red box in view": 0, "straight ahead": 2, "ahead left": 0, "ahead right": 1}
    for seed in range(10):
        env.reset(seed=seed)
        while True:
            view, action = env.state_text(), envs.expert_action(env)
            assert action == next(a for key, a in want.items() if key in view), (view, action)
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                wins += info["success"]
                break
    assert wins >= 9, f"the expert reached the box in {wins} of 10 episodes"


def test_ezpoints_expert_solves_every_deal():
    """envs.ezpoints_expert plays a correct formula from the true deal: 100 of 100 deals solved in 4 symbols; once
    the formula can no longer make 12 it has no action (None), and the other card games have no expert."""
    env = envs.make_env("gym_cards/EZPoints-v0")
    for seed in range(100):
        env.reset(seed=seed)
        for _ in range(4):
            _, reward, terminated, _, info = env.step(envs.expert_action(env))
        assert terminated and info["success"] and reward == 10, (seed, env.unwrapped.formula)
    env.reset(seed=0)
    env.step(env.actions.index("+"))  # "+" first: no prefix of a correct formula
    assert envs.expert_action(env) is None
    for env_id in ("gym_cards/NumberLine-v0", "gym_cards/Points24-v0", "gym_cards/Blackjack-v0"):
        other = envs.make_env(env_id)
        other.reset(seed=0)
        assert envs.expert_action(other) is None


def test_prior_mixes_the_expert_in_only_where_a_recipe_has_one():
    """Only MiniWorld and EZPoints carry a prior (0 < q < 1); without one the answers' actions are the uniformly
    random draws they always were (the other families' data, cards and cache keys stay). With q, the expert's
    action is drawn with probability q + (1 - q) / actions."""
    assert {n for n, c in tiny_vlm.FAMILIES.items() if c.prior_q} == {"ezpoints", "miniworld"}
    assert all(0 < tiny_vlm.FAMILIES[n].prior_q < 1 for n in ("ezpoints", "miniworld"))
    assert "prior_q" not in dataclasses.asdict(tiny_vlm.FAMILIES["numberline"])
    answer = tiny_vlm.answer_format(envs.make_env("gym_cards/EZPoints-v0"))
    state = tiny_vlm.State(([], "prompt", "Cards: 5, 7.", envs.EZPointsEnv.ACTIONS, answer), expert=4)
    rng_plain, rng_uniform = np.random.default_rng(1), np.random.default_rng(1)
    plain = [tiny_vlm.format_example(state, rng_plain)[2] for _ in range(50)]
    assert plain == [answer("Cards: 5, 7.", int(rng_uniform.integers(13))) for _ in range(50)]
    rng = np.random.default_rng(2)
    share = np.mean([json.loads(tiny_vlm.format_example(state, rng, 0.6)[2])["action"] == "5" for _ in range(4000)])
    assert abs(share - (0.6 + 0.4 / 13)) < 0.03, share  # 4 binomial standard errors: 0.03


# The shipped models' prior as measured by benchmarks/prior.py (docs/tiny_model.md, "A weak prior"): zero-shot success
# at temperature 1 over 200 episodes, and the mean probability of the expert's action on 200 held-out states
PRIOR = {"gym_cards/EZPoints-v0": dict(success=0.100, expert_probability=0.481, episodes=40),
         "MiniWorld-OneRoom-v0": dict(success=0.215, expert_probability=0.419, episodes=20)}


@pytest.mark.parametrize("env_id", list(PRIOR))
def test_shipped_prior_is_weak_and_as_measured(tiny_families, env_id):
    """The base model's hint, re-measured on a small sample: the expert's mean probability on 100 held-out states
    within 3 standard errors of the figure above, at most 0.75 (a hint, not the answer) and 3 standard errors above
    1 / actions (a vanished prior: 0.08 / 0.25); zero-shot success at temperature 1 within 3 binomial standard errors
    of the figure above, and at least one success."""
    figures, chance = PRIOR[env_id], 1 / len(envs.make_env(env_id).actions)
    model, processor = tiny_families(tiny_vlm.family_of(env_id))
    probabilities = tiny_vlm.expert_probabilities(model, processor, env_id, num_states=100)
    mean, error = probabilities.mean(), probabilities.std() / math.sqrt(len(probabilities))
    assert abs(mean - figures["expert_probability"]) <= 3 * error and chance + 3 * error < mean <= 0.75, (mean, error)
    torch.manual_seed(1)  # as benchmarks/prior.py: episode k reset with seed 1 + k, 20 envs stepped together
    n, p = figures["episodes"], figures["success"]
    record = evaluate.evaluate(model, processor, env_id, num_episodes=n, num_envs=20, temperature=1.0,
                               max_new_tokens=48)
    success = record["success_rate"]
    assert abs(success - p) <= 3 * math.sqrt(p * (1 - p) / n) and success > 0, success


def test_a_short_run_from_the_prior_raises_the_experts_probability(tiny_families, tmp_path):
    """RL lifts the prior, seen where it moves first: 384 env steps of vldac.py on OneRoom (8 envs, 2 warm-up and 4
    policy updates) raise the base model's probability of the expert's action on 100 held-out states, on most states
    and by far more than its paired standard error (measured: 0.417 -> 0.484, SE 0.005, up on 94 of 100). The run
    uses the dense reward (--reward-shaping: progress toward the box): under the sparse one no OneRoom episode ends
    within 48 steps per env (they run up to 128), so nothing rewards the update this early (measured at 512 env
    steps: 0.417 -> 0.379, the update fitting noise)."""
    out = tmp_path / "model"
    result = run_script(tmp_path, "--env-id", "MiniWorld-OneRoom-v0", "--num-envs", "8", "--total-timesteps", "384",
                        "--reward-shaping", "0.3", "--seed", "1", "--eval-episodes", "0", "--save-model",
                        "--save-dir", str(out), "--model-id", "tiny")
    assert result.returncode == 0, result.stderr[-2000:]
    env_id = "MiniWorld-OneRoom-v0"
    base = tiny_vlm.expert_probabilities(*tiny_families("miniworld"), env_id, num_states=100)
    trained = tiny_vlm.expert_probabilities(*vlm.load_policy(str(out)), env_id, num_states=100)
    gain = trained - base  # paired by state
    error = gain.std(ddof=1) / math.sqrt(len(gain))
    assert gain.mean() > max(0.02, 4 * error) and (gain > 0).mean() > 0.75, (base.mean(), trained.mean(), error)


# ---- evaluate.py ----

EVAL = ["--env-ids", ENV_ID, "--num-episodes", "4", "--num-envs", "4", "--caption-frames", "10"]

RECORD_FIELDS = {"model_id", "env_id", "num_episodes", "success_rate", "success_ci95", "return_mean", "return_std",
                 "length_mean", "parse_failure_rate", "parsed_actions", "response_tokens_mean", "caption_accuracy",
                 "episodes", "videos"}


def run_eval(cwd, *flags, script="evaluate.py"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(HERE / script), *flags], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def comparable(record):
    """A record without the paths that differ between two output files."""
    return {k: v for k, v in record.items() if k != "videos"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_pretrained):
    """One greedy run of the tiny model with --capture-video, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("eval")
    result = run_eval(tmp, "--model-ids", "tiny", *EVAL, "--capture-video", "--output", "out.json")
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp, result, json.loads((tmp / "out.json").read_text())


def test_wilson_interval():
    assert evaluate.wilson_interval(0, 50)[0] == 0.0 and 0 < evaluate.wilson_interval(0, 50)[1] < 0.1
    low, high = evaluate.wilson_interval(25, 50)
    assert math.isclose(low, 0.3664, abs_tol=1e-3) and math.isclose(high, 0.6336, abs_tol=1e-3)  # textbook value
    assert evaluate.wilson_interval(50, 50)[1] == 1.0


def test_smoke_json_fields_and_ranges(smoke):
    _, result, data = smoke
    assert {"model_ids", "seed", "temperature", "decoding", "per_model", "records"} <= data.keys()
    assert data["model_ids"] == ["tiny"] and data["per_model"]["tiny"]["max_new_tokens"] == 48
    (record,) = data["records"]
    assert RECORD_FIELDS <= record.keys(), RECORD_FIELDS - record.keys()
    assert record["num_episodes"] == len(record["episodes"]) == 4
    assert [e["episode"] for e in record["episodes"]] == [0, 1, 2, 3]
    assert 0 <= record["success_rate"] <= 1
    low, high = record["success_ci95"]
    assert 0 <= low <= record["success_rate"] <= high <= 1
    assert 0 <= record["parse_failure_rate"] <= 1
    steps = sum(e["episodic_length"] for e in record["episodes"])  # every parsed answer counted once, by action
    assert sum(record["parsed_actions"].values()) == round(steps * (1 - record["parse_failure_rate"]))
    assert set(record["parsed_actions"]) <= {"+", "-"}  # NumberLine's actions
    assert 1 <= record["length_mean"] <= 10  # NumberLine truncates at 10 steps
    assert 0 < record["response_tokens_mean"] <= 48
    assert record["return_std"] >= 0 and 0 <= record["caption_accuracy"] <= 1  # probed: a tiny model
    assert "| tiny | gym_cards/NumberLine-v0 |" in result.stdout


def test_capture_video_frames(smoke):
    """One GIF frame per step plus the final state: episode length + 1."""
    tmp, _, data = smoke
    (record,) = data["records"]
    assert len(record["videos"]) == 2  # --video-episodes default
    lengths = {e["episode"]: e["episodic_length"] for e in record["episodes"]}
    for video in record["videos"]:
        path = tmp / video
        assert path.exists() and path.parent == tmp / "out" / "tiny"
        episode = int(path.stem.rsplit("episode", 1)[1])
        with Image.open(path) as gif:
            assert gif.n_frames == lengths[episode] + 1, (video, gif.n_frames, lengths[episode])
            assert gif.width >= 240


def test_greedy_is_reproducible_and_two_models_two_rows(smoke, tmp_path):
    _, _, first = smoke
    result = run_eval(tmp_path, "--model-ids", "tiny", "tiny", *EVAL, "--output", "again.json")
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "again.json").read_text())["records"]
    assert len(records) == 2 and result.stdout.count("| tiny | gym_cards/NumberLine-v0 |") == 2
    assert comparable(records[0]) == comparable(records[1]) == comparable(first["records"][0])


def test_trained_checkpoint_loads_and_evaluates(tmp_path, tiny_pretrained):
    """Train, then evaluate the run directory itself (the model it saved is found in it); a run that saved no
    model is a one-line error of evaluate.py's own."""
    train = run_eval(tmp_path, "--env-id", ENV_ID, "--num-envs", "2", "--num-steps", "5", "--total-timesteps", "10",
                     "--minibatch-size", "5", "--micro-batch-size", "5", "--max-new-tokens", "6",
                     "--value-warmup-iters", "1", "--eval-episodes", "2", script="vldac.py")
    assert train.returncode == 0, train.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    run = str(run_dir.relative_to(tmp_path))
    result = run_eval(tmp_path, "--model-ids", run, *EVAL, "--output", "ckpt.json")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "ckpt.json").read_text())
    assert data["per_model"][run]["max_new_tokens"] == 48  # recognised as tiny-based through its args.json
    (record,) = data["records"]
    assert record["model_id"] == run and len(record["episodes"]) == 4
    assert record["caption_accuracy"] is not None
    shutil.rmtree(run_dir / "model")
    (run_dir / "checkpoint.pt").touch()
    result = run_eval(tmp_path, "--model-ids", run, *EVAL, "--output", "none.json")
    assert result.returncode == 2 and result.stderr.startswith("evaluate.py: error:"), result.stderr
    assert result.stderr.count("\n") == 1 and "saved no model" in result.stderr, result.stderr


@pytest.mark.parametrize("env_id, episodes", [("gym_cards/NumberLine-v0", 3), ("MiniWorld-OneRoom-v0", 1)])
def test_saved_trajectories_replay_exactly(tiny_dir, tmp_path, env_id, episodes):
    """evaluate(trajectory_dir=...) writes one JSON line per step and the frames; replaying the recorded actions
    in a fresh env with the episode's seed gives back every frame (pixel for pixel), reward and ending, and each
    line's `frames` are the prompt's K images."""
    model, processor = vlm.load_policy(str(tiny_dir), "cpu")
    result = evaluate.evaluate(model, processor, env_id, num_episodes=episodes, num_envs=2, max_new_tokens=4,
                               seed=5, trajectory_dir=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / f"{env_id.replace('/', '_')}.jsonl").read_text().splitlines()]
    assert len(lines) == sum(e["episodic_length"] for e in result["episodes"])
    env = envs.make_env(env_id)
    for episode in range(episodes):
        steps = sorted((x for x in lines if x["episode"] == episode), key=lambda x: x["step"])
        frames, _ = env.reset(seed=5 + episode)
        for t, x in enumerate(steps):
            assert x["step"] == t and x["env_id"] == env_id and x["prompt"] == env.prompt()
            assert x["action_name"] == env.actions[x["action"]] and isinstance(x["answer"], str)
            assert len(x["frames"]) == env.num_frames
            for path, frame in zip(x["frames"], frames):
                assert np.array_equal(np.array(Image.open(tmp_path / path)), frame), (t, path)
            frames, reward, terminated, truncated, info = env.step(x["action"])
            assert (x["reward"], x["terminated"], x["truncated"]) == (reward, terminated, truncated)
        assert terminated or truncated


@pytest.mark.parametrize("flags", [["--env-ids", "gym_cards/NoSuchGame-v0"],
                                   ["--model-ids", "/no/such/model", "--env-ids", ENV_ID],
                                   ["--num-episodes", "0"]])
def test_evaluate_bad_inputs_one_line_exit_2(tmp_path, flags):
    result = run_eval(tmp_path, *flags, "--output", "x.json")
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr
    assert not (tmp_path / "x.json").exists()


def test_evaluate_miniworld_without_gl_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("PYGLET_HEADLESS", "False")
    monkeypatch.setenv("DISPLAY", ":12345")
    result = run_eval(tmp_path, "--env-ids", "MiniWorld-OneRoom-v0", "--output", "x.json")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "apt-get install" in result.stderr


def test_evaluate_checks_every_model_first_and_keeps_finished_rows(tiny_dir, tmp_path):
    """Every --model-ids entry is resolved before any model loads (a missing one, a run still training: one line,
    nothing written); a model that fails to load later leaves the rows already measured in the JSON."""
    training = tmp_path / "still_training"
    training.mkdir()
    torch.save({}, training / "checkpoint.pt")
    for bad, says in ((str(tmp_path / "nope"), "no such directory"), (str(training), "still training")):
        result = run_eval(tmp_path, "--model-ids", str(tiny_dir), bad, *EVAL, "--output", str(tmp_path / "a.json"))
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
        assert not (tmp_path / "a.json").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    output = tmp_path / "b.json"
    result = run_eval(tmp_path, "--model-ids", str(tiny_dir), str(broken), *EVAL, "--output", str(output))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    records = json.loads(output.read_text())["records"]
    assert [r["model_id"] for r in records] == [str(tiny_dir)] and RECORD_FIELDS <= set(records[0])


# ---- the scripts end to end: --help, the same seed twice, switches, errors ----

def test_module_graph_has_no_cycle_and_evaluate_matches_training_defaults():
    """No module imports the training loop or itself; flags.py (the refusals) imports no project module and
    checkpoint.py no model code; evaluate's default answer lengths are the defaults tables' (pinned together)."""
    project = {p.stem for p in HERE.glob("*.py")}

    def imports(module):  # the project modules `module` imports, at any depth of its code
        tree = ast.parse((HERE / f"{module}.py").read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        return {name.split(".")[0] for name in names} & project

    def transitive(module):  # everything it imports, at any remove
        seen, todo = set(), [module]
        while todo:
            for name in imports(todo.pop()) - seen:
                seen.add(name)
                todo.append(name)
        return seen

    for module in ("evaluate", "tiny_vlm", "rollout", "vlm", "checkpoint", "distributed", "envs", "config",
                   "baselines"):
        seen = transitive(module)
        assert "vldac" not in seen and module not in seen, (module, sorted(seen))
    # the one-line refusal imports nothing of the project, and saving a run loads no model code
    assert imports("flags") == set() and not transitive("checkpoint") & {"vlm", "tiny_vlm", "rollout"}
    assert evaluate.DEFAULT_MAX_NEW_TOKENS == dict(tiny=config.TINY_DEFAULTS["max_new_tokens"],
                                                   paper=config.PAPER_DEFAULTS["max_new_tokens"])


SCRIPTS = ["vldac.py", "evaluate.py", "tiny_vlm.py",
           *sorted(str(p.relative_to(HERE)) for p in (HERE / "benchmarks").glob("[!_]*.py"))]


def undescribed_flags(help_text):
    """argparse options whose help line has no description (an option line with nothing after the flag and its
    metavar, and no indented description line under it)."""
    lines = help_text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^  (-\w, )?(--[\w-]+)(?: [A-Z_\[\]{},. ]+)?$", line)
        next_line = lines[i + 1] if i + 1 < len(lines) else ""
        if m and m[2] != "--help" and not re.match(r"^ {6,}\S", next_line):
            missing.append(m[2])
    return missing


def test_every_script_answers_help_without_loading_a_model(tmp_path):
    """--help exits 0 at once (nothing is built: the model cache stays empty) and describes every flag.
    All scripts at once, as parallel processes (each mostly imports torch)."""
    env = {**os.environ, "VLDAC_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE)}  # benchmarks run as modules of the repository: python -m benchmarks.NAME

    def command(script):
        if script.startswith("benchmarks/"):
            return [sys.executable, "-m", script[: -len(".py")].replace("/", ".")]
        return [sys.executable, str(HERE / script)]

    procs = {script: subprocess.Popen([*command(script), "--help"], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script in SCRIPTS}
    problems = {}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or "usage" not in out.lower():
            problems[script] = f"exit {proc.returncode}: {(out + err)[-500:]}"
        elif undescribed_flags(out):
            problems[script] = f"flags without a description: {undescribed_flags(out)}"
    assert not problems, problems
    assert not (tmp_path / "cache").exists(), "a script's --help built the tiny model"


def test_smoke_run_twice_same_seed(tiny_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        result = run_script(tmp_path / name, *SMOKE, "--model-id", str(tiny_dir), "--seed", "3",
                            "--trajectories-every", "2")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("\niter ") + result.stdout.startswith("iter ") == 2, result.stdout
        (run_dir,) = (tmp_path / name / "runs").iterdir()
        runs.append(run_dir)
    first, second = scalars(runs[0]), scalars(runs[1])
    assert set(TAGS) <= set(first), sorted(set(TAGS) - set(first))
    # --value-warmup-iters 1: iteration 1 is the warm-up (policy frozen over both epochs: approx_kl 0), 2 is not
    assert "iter 1/2" in result.stdout.split("(value warm-up)")[0] and result.stdout.count("(value warm-up)") == 1
    approx_kl = [v for _, v in first["losses/approx_kl"]]
    assert approx_kl[0] < 1e-9 and approx_kl[1] > 1e-7, approx_kl
    lr = [v for _, v in first["charts/learning_rate"]]
    np.testing.assert_allclose(lr, [3e-4, 3e-5], rtol=1e-6)  # TINY_DEFAULTS, the cosine's two ends
    assert [s for s, _ in first["losses/value_loss"]] == [10, 20], first["losses/value_loss"]  # x-axis: env steps
    for tag in set(first) - {"charts/SPS"}:
        assert first[tag] == second[tag], tag  # same seed -> identical logged metrics
    model_dir = runs[0] / "model"
    assert (model_dir / "value_head.pt").exists() and (model_dir / "args.json").exists()
    policy, _ = vlm.load_policy(str(model_dir))
    assert not isinstance(policy, PeftModel)
    # --trajectories-every 2: iteration 2's rollout, every step (2 envs x 5), the same in both runs, as logged
    assert sorted(p.name for p in (runs[0] / "trajectories").iterdir()) == ["iter2"]
    texts = [(run / "trajectories" / "iter2" / "gym_cards_NumberLine-v0.jsonl").read_text() for run in runs]
    assert texts[0] == texts[1]
    steps = [json.loads(line) for line in texts[0].splitlines()]
    assert len(steps) == 10
    for episode in {s["episode"] for s in steps}:  # an episode's steps in this rollout are consecutive
        numbers = [s["step"] for s in steps if s["episode"] == episode]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    assert sum(s["parse_failed"] for s in steps) / 10 == pytest.approx(first["charts/parse_failure_rate"][1][1])
    assert all((runs[0] / "trajectories" / "iter2" / f).exists() for s in steps for f in s["frames"])


def test_ablation_learning_curves(tmp_path):
    """benchmarks/ablations.py's figure: per variant the mean (+- std) over seeds of each seed's 3-iteration moving
    average of the success rate, on a common grid of env steps; one PNG per env."""
    sys.path.insert(0, str(HERE / "benchmarks"))
    import ablations

    runs = [dict(env_id=ENV_ID, variant="vldac", steps=[128, 256, 384, 512], success=s)
            for s in ([0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0])]
    grid, mean, std = ablations.learning_curve(runs, points=5)
    assert grid.tolist() == [0, 128, 256, 384, 512]
    # moving averages 1/3, 2/3 and 2/3, 1 at env steps 384, 512; flat before 384
    assert mean == pytest.approx([0.5, 0.5, 0.5, 0.5, 5 / 6]) and std[-1] == pytest.approx(1 / 6)
    runs.append(dict(env_id=ENV_ID, variant="loop", steps=[100, 200, 300], success=[0.0, 0.5, 1.0]))
    path = ablations.plot(runs, ENV_ID, ["vldac", "loop", "rl4vlm-0.5"], tmp_path / "curve.png", target=0.9)
    assert Image.open(path).size[0] > 500


def test_ablation_paper_grid_counts_episodes(tmp_path):
    """benchmarks/ablations.py --grid paper: its cells in priority order; success pooled over the episodes that
    ended (train.log's counts: a MiniWorld iteration ends one or two), standard errors over seeds, the transfer cache
    refusing an interrupted evaluation."""
    sys.path.insert(0, str(HERE / "benchmarks"))
    import ablations

    cells = ablations.GRIDS["paper"]
    assert len(cells) == len(set(cells)) == 17 and all(v in ablations.VARIANTS for _, v in cells)
    assert cells[:4] == [("MiniWorld-OneRoom-v0", v) for v in ("vldac", "rl4vlm-published-0.35",
                                                                "rl4vlm-published-0.5", "loop")]
    assert cells[-1] == ("MiniWorld-OneRoom-v0", "vldac-no-kl")
    for _, variants, rooms in ablations.COMPARISONS["paper"]:  # every baseline compared where the grid ran it
        assert rooms and all((env, v) in cells and (env, "vldac") in cells for env in rooms for v in variants)
    (tmp_path / "train.log").write_text("".join(
        f"iter {i}/4 steps {128 * i} SPS 5.0 | success {s:.2f} return 0.1 ({n} episodes) parse_fail 0.00 | x\n"
        for i, s, n in [(1, 1.0, 1), (2, 0.0, 15), (3, 0.5, 2), (4, 0.75, 4)]))
    steps = [128, 256, 384, 512]
    run = dict(steps=steps, success=[1.0, 0.0, 0.5, 0.75], episodes=ablations.episode_counts(tmp_path, steps),
               command=["vldac.py", "--total-timesteps", "512"])
    assert run["episodes"] == [1, 15, 2, 4]
    # the trailing 3 iterations hold >= 16 episodes from the third on: (1 + 0 + 1) / 18, (0 + 1 + 3) / 21
    assert ablations.smoothed(run) == [None, None, pytest.approx(2 / 18), pytest.approx(4 / 21)]
    assert ablations.last_quarter(run) == (3, 4) and ablations.steps_to(run, 0.9) is None
    assert ablations.mean_se([0.5, 1.0]) == "0.75 +- 0.25" and ablations.mean_se([0.5]) == "0.50"
    # the table: each seed's last-quarter rate and caption accuracy beside the mean over seeds
    runs = [dict(run, env_id=ENV_ID, variant="loop", seed=seed, success=success, caption_after=caption, wall_s=60.0)
            for seed, success, caption in [(1, [1.0, 0.0, 0.5, 0.75], 0.5), (2, [1.0, 0.0, 0.5, 0.25], 0.25)]]
    (row,) = ablations.table(runs, [(ENV_ID, "loop")], {}, {ENV_ID: 1.0}).splitlines()[2:]
    assert "| 0.50 +- 0.25 (0.75 0.25; 8) |" in row and "| 1.000 -> 0.375 (0.500 0.250) |" in row, row
    (row,) = ablations.table(runs[:1], [(ENV_ID, "loop")], {}, {ENV_ID: 1.0}).splitlines()[2:]
    assert "| 0.75 (4) |" in row and "| 1.000 -> 0.500 |" in row, row
    record = dict(env_id=ablations.TRANSFER_ENVS[0], num_episodes=2)
    (tmp_path / "transfer.json").write_text(json.dumps(dict(temperature=1.0, records=[record])))
    assert ablations.transfer_records(tmp_path / "transfer.json", ablations.TRANSFER_ENVS, 2, 1.0) is None  # 1 of 3
    assert ablations.transfer_records(tmp_path / "transfer.json", ablations.TRANSFER_ENVS[:1], 2, 1.0) == {
        record["env_id"]: record}
    assert ablations.transfer_records(tmp_path / "transfer.json", ablations.TRANSFER_ENVS[:1], 2, 0.0) is None


def test_ablation_comparison_is_an_exact_rank_test():
    """VL-DAC against a baseline run for run: pairs won within an env (ties half), and the exact one-sided p over
    every relabelling of each env's runs, checked against rank sums counted by hand."""
    sys.path.insert(0, str(HERE / "benchmarks"))
    import ablations

    ours, theirs = {"a": [0.5, 0.3, 0.9]}, {"a": [0.1, 0.4, 0.2, 0.0]}
    # ranks 1..7, ours {4, 6, 7}: rank sum 17; of the 35 three-rank subsets only {4, 6, 7} and {5, 6, 7} reach 17
    assert ablations.pairs_won(ours, theirs) == (11, 12)
    assert ablations.permutation_p(ours, theirs) == pytest.approx(2 / 35)
    # two envs relabel independently: (1/6)^2 for two clean sweeps; a run of another env is never paired
    sweep = ablations.permutation_p({"a": [3, 4], "b": [3, 4]}, {"a": [1, 2], "b": [1, 2], "c": [9]})
    assert sweep == pytest.approx(1 / 36) and ablations.pairs_won({"a": [1]}, {"a": [1], "c": [9]}) == (0.5, 1)
    assert ablations.permutation_p({"a": [1]}, {"a": [1]}) == 1.0
    # ties inside the relabellings: [1, 2] against [1, 1] wins 3 of 4 pairs, as do the 3 picks holding the 2 (of 6)
    assert ablations.pairs_won({"a": [1, 2]}, {"a": [1, 1]}) == (3, 4)
    assert ablations.permutation_p({"a": [1, 2]}, {"a": [1, 1]}) == 0.5
    run = lambda variant, seed, caption, success: dict(
        env_id=ENV_ID, variant=variant, seed=seed, caption_after=caption, steps=[100], success=[success],
        episodes=[4], command=["vldac.py", "--total-timesteps", "100"])
    runs = [run("vldac", 1, 0.9, 0.75), run("vldac", 2, 0.8, 0.25), run("loop", 1, 0.5, 0.5)]
    (row,) = ablations.comparison_table(runs, [("LOOP", ("loop",), (ENV_ID, "other"))]).splitlines()[2:]
    assert row == f"| LOOP | {ENV_ID.split('/')[-1]}, other | 2 / 1 | 1 of 2 | 0.67 | 2 of 2 | 0.33 |", row


def test_ablation_transfer_table_has_both_decodings():
    """The transfer table: per model and env, success sampled and greedy, each seed's rate, the count pooled over
    seeds with its Wilson interval, the caption probe (from the sampled evaluation) beside the base's and the share
    of unparsable sampled answers; a decoding not yet evaluated for a seed counts only the seeds that have it."""
    sys.path.insert(0, str(HERE / "benchmarks"))
    import ablations

    from evaluate import wilson_interval

    def model(wins, caption, unparsable=0.0):  # {decoding: {env: record}}; 4 episodes per env, `wins[d]` won
        return {d: {env: dict(success_rate=wins[d] / 4, episodes=[dict(success=k < wins[d]) for k in range(4)],
                              caption_accuracy=caption if d == "sampled" else None, parse_failure_rate=unparsable)
                    for env in ablations.TRANSFER_ENVS} if d in wins else None for d in ablations.TRANSFER_DECODING}

    base = model(dict(sampled=1, greedy=4), 0.9)
    trained = {"vldac": [model(dict(sampled=2, greedy=3), 0.8, 0.1), model(dict(sampled=3), 0.7, 0.4)],
               "loop": [], "rl4vlm": [model(dict(greedy=0), None)]}
    text = ablations.transfer_table(base, trained, 4)
    rows = [r for r in text.splitlines() if r.startswith("| ") and "Hallway" in r]
    assert len(rows) == 4 and rows[2] == "| loop | Hallway | 0 / 0 | - | - | - | - | - (0.900) | - |"
    low, high = wilson_interval(5, 8)
    assert rows[1].startswith(f"| vldac | Hallway | 2 / 1 | 0.62 +- 0.12 (0.50 0.75) | 5 / 8 [{low:.2f}, {high:.2f}] "
                              "| 0.75 (0.75) | 3 / 4 [") and rows[1].endswith("| 0.750 (0.900) | 0.25 |")
    assert "| 0.25 (0.25) | 1 / 4 [" in rows[0] and "| 1.00 (1.00) | 4 / 4 [" in rows[0]
    assert rows[3].startswith("| rl4vlm | Hallway | 0 / 1 | - | - | 0.00 (0.00) | 0 / 4 [0.00, ")
    assert rows[3].endswith("| - (0.900) | - |") and rows[0].endswith("| 0.900 (0.900) | 0.00 |")
    assert text.splitlines()[0].count("sampled") == 4 and text.splitlines()[0].count("greedy") == 3


def test_baseline_and_ablation_switches_smoke_run(tiny_dir, tmp_path):
    """RL4VLM's loss, no warm-up, no stop-gradient and no KL together, through the script."""
    flags = [*SMOKE[: SMOKE.index("--value-warmup-iters")], "--no-save-model"]
    result = run_script(tmp_path, *flags, "--model-id", str(tiny_dir), "--policy-loss", "rl4vlm", "--thought-coef",
                        "0.35", "--value-warmup-iters", "0", "--no-value-stop-grad", "--kl-beta", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("iter ") == 2 and "warm-up" not in result.stdout, result.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    logged = scalars(run_dir)
    assert all(math.isfinite(v) for _, v in logged["losses/policy_loss"])
    assert logged["losses/approx_kl"][0][1] > 1e-7  # --value-warmup-iters 0: the policy moves from iteration 1


def test_cli_errors_exit_2(tmp_path):
    result = run_script(tmp_path, "--env-id", "gym_cards/Nope-v0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    # a hub id that cannot be loaded: offline (no network here) or not on the hub; one line either way
    result = run_script(tmp_path, "--model-id", "nobody/no-such-vlm", "--total-timesteps", "512", offline=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "runs").exists(), "a run that failed to start left a run directory behind"
    assert "`tiny`" in result.stderr and result.stderr.startswith("vldac.py: error:")


# ---- learning: the quick start, shortened ----

def test_quickstart_learns_numberline(tiny_pretrained, tmp_path):
    """`python vldac.py --env-id gym_cards/NumberLine-v0` (the shipped tiny model, its defaults) cut to 4608 env
    steps: the success rate of the last 8 iterations (about 300 episodes; measured 0.98) is far above the random
    policy's 0.61 (4 standard errors at 0.75). The full acceptance (the last quarter's episodes >= 0.9, 5 seeds,
    and other builds of the recipe) is benchmarks/quickstart_robustness.py. Runs first, beside the other tests
    (conftest.py)."""
    env = dict(os.environ)
    result = subprocess.run([sys.executable, str(HERE / "vldac.py"), "--env-id", "gym_cards/NumberLine-v0",
                             "--total-timesteps", "4608", "--seed", "1", "--eval-episodes", "10", "--threads", "1"],
                            cwd=tmp_path,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    # it ends with what a user wants next: the model saved, evaluated, GIFs, and where everything is
    assert (run_dir / "model" / "model.safetensors").stat().st_mode & 0o044, "the saved weights must be readable"
    assert len(list((run_dir / "videos").glob("*.gif"))) == 2 and "GIFs: runs/" in result.stdout, result.stdout[-800:]
    assert "tensorboard --logdir runs" in result.stdout and "evaluate.py --model-ids runs/" in result.stdout
    success = [value for _, value in scalars(run_dir)["charts/success_rate"]]
    assert len(success) == 36, len(success)
    assert np.mean(success[-8:]) >= 0.75, f"no learning: success by iteration {np.round(success, 2).tolist()}"
