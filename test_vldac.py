# Tests for the VL-DAC reference implementation. Run: python -m pytest -q test_vldac.py
import json
import os
import re
import subprocess
import sys
import time
import warnings
from functools import lru_cache
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

import envs

# ---- envs.py ----


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
    start = time.perf_counter()
    action, failed = envs.parse_action(text, actions, np.random.default_rng(0))
    assert failed and 0 <= action < len(actions) and isinstance(action, int)
    assert time.perf_counter() - start < 2.0
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


@settings(max_examples=400, deadline=None)
@given(
    text=st.one_of(
        st.text(),
        st.text(alphabet='{}[]"\':,action +-=0123 \n\\', max_size=60),
        st.builds(lambda a, b: a + '{"action": ' + b, st.text(max_size=20), st.text(max_size=20)),
    ),
    actions=st.sampled_from([NL, MW, P24, ["stand", "hit"]]),
)
def test_parse_fuzz_never_raises_and_is_valid(text, actions):
    action, failed = envs.parse_action(text, actions, np.random.default_rng(0))
    assert isinstance(action, int) and 0 <= action < len(actions) and isinstance(failed, bool)


def test_invalid_action_penalty_and_info():
    env = envs.make_env("gym_cards/NumberLine-v0", invalid_action_penalty=-0.5)
    env.reset(seed=0)
    env.unwrapped.position, env.unwrapped.goal = 2, 4
    _, r, _, _, info = env.step(answer("+"))
    assert (r, info["action"], info["parse_failed"], info["success"]) == (0.0, 1, False, False)
    _, r, _, _, info = env.step("gibberish")
    assert info["parse_failed"] and info["action"] in (0, 1)
    assert r == {0: -1.0, 1: 1.0}[info["action"]] - 0.5


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


@pytest.mark.parametrize("env_id", envs.CARD_IDS)
def test_card_step_is_fast(env_id):
    env = envs.make_env(env_id)
    env.reset(seed=0)
    env.step(0)
    start, n = time.perf_counter(), 300
    for i in range(n):
        _, _, term, trunc, _ = env.step(answer(env.actions[i % len(env.actions)]))
        if term or trunc:
            env.reset()
    per_step = (time.perf_counter() - start) / n
    assert per_step < 0.005, f"{env_id}: {per_step * 1e3:.2f} ms per step"  # ~0.1-0.3 ms on 2 CPU cores


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
