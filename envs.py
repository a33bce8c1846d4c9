# Environments for VL-DAC (arXiv 2508.04280): the gym-cards suite (RL4VLM, Zhai et al. 2024)
# re-implemented, and MiniWorld, both behind a text interface: last K frames + prompt in, free text out.
# docs/environments.md states the rules, rewards, prompts and the answer parser in full.
"""Usage:
    import envs                                   # registers gym_cards/* with gymnasium
    env = envs.make_env("gym_cards/EZPoints-v0")  # a TextEnv
    frames, info = env.reset(seed=0)              # (K, H, W, 3) uint8, oldest frame first
    frames, reward, terminated, truncated, info = env.step('{"thoughts": "...", "action": "5"}')

Measured step cost (TextEnv.step incl. parsing and resets, 2 CPU cores, MiniWorld at 80x60):
NumberLine 0.07 ms, EZPoints 0.25 ms, Points24 0.27 ms, Blackjack 0.29 ms, MiniWorld 0.4-0.6 ms.
"""
import contextlib
import functools
import io
import itertools
import json
import math
import operator
import os
import re
from collections import deque
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image, ImageDraw, ImageFont

# MiniWorld renders with pyglet; headless EGL needs this before pyglet is first imported.
os.environ.setdefault("PYGLET_HEADLESS", "True")

CARD_IDS = ["gym_cards/NumberLine-v0", "gym_cards/EZPoints-v0", "gym_cards/Points24-v0", "gym_cards/Blackjack-v0"]
MINIWORLD_IDS = ["MiniWorld-OneRoom-v0", "MiniWorld-Hallway-v0", "MiniWorld-FourRooms-v0", "MiniWorld-WallGap-v0"]
ENV_IDS = CARD_IDS + MINIWORLD_IDS
MINIWORLD_ACTIONS = ["turn left", "turn right", "move forward", "move back"]  # indices 0..3, as the paper
MINIWORLD_MAX_STEPS = 128  # the authors' TimeLimit; the envs' own limits (180-300) only scale the reward

RANKS = "A23456789TJQK"  # rank r (1..13) is RANKS[r - 1]; card codes are suit + rank, e.g. "HT", as the original
RED_SUITS = "HD"
TABLE = "#35654d"


def _label(rank):
    """What a card shows: the rank code "T" is printed as "10"."""
    return "10" if rank == "T" else rank


# ---------------------------------------------------------------------------------------------
# Safe arithmetic for the formula games (the original code used Python's builtin on the string).
# Same semantics: tokens of "".join(map(str, formula)), so adjacent numbers concatenate ("2","4" -> 24);
# Python operators and precedence incl. "**" and "//" (two "*" or "/" in a row), unary +/-, true
# division. Anything else (syntax error, division by zero, overflow) raises ValueError/ArithmeticError.
_TOKEN = re.compile(r"\s*(?:(\d+)|(\*\*|//|[-+*/()]))")
_BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv}


def calc(text):
    """Value of an arithmetic string, Python semantics; raises on anything that is not one."""
    tokens, pos, text = [], 0, text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"bad character at {pos}: {text[pos]!r}")
        tokens.append(int(m[1]) if m[1] else m[2])
        pos = m.end()
    tokens = [None] + tokens[::-1]  # a stack: tokens[-1] is the next token, None the end
    take = tokens.pop

    def expr():  # expr := term (("+" | "-") term)*
        value = term()
        while tokens[-1] in ("+", "-"):
            value = _BINARY[take()](value, term())
        return value

    def term():  # term := factor (("*" | "/" | "//") factor)*
        value = factor()
        while tokens[-1] in ("*", "/", "//"):
            value = _BINARY[take()](value, factor())
        return value

    def factor():  # factor := ("+" | "-") factor | power     (so -2**2 == -4, as in Python)
        if tokens[-1] in ("+", "-"):
            return operator.neg(factor()) if take() == "-" else operator.pos(factor())
        return power()

    def power():  # power := atom ["**" factor]           (right-associative: 2**3**2 == 512)
        base = atom()
        if tokens[-1] != "**":
            return base
        take()
        exponent = factor()
        # The original would hang on 10**10**10**10; nothing that large can equal 12 or 24.
        if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1:
            if exponent * base.bit_length() > 100_000:
                raise OverflowError("power too large")
        return operator.pow(base, exponent)

    def atom():  # atom := NUMBER | "(" expr ")"
        token = take()
        if isinstance(token, int):
            return token
        if token == "(":
            value = expr()
            if take() == ")":
                return value
        raise ValueError("syntax error")

    value = expr()
    if tokens[-1] is not None:
        raise ValueError("syntax error: trailing tokens")
    return value


def formula_equals(formula, target):
    """Exact comparison of the formula's value with the target; any error counts as not equal."""
    try:
        return calc("".join(map(str, formula))) == target
    except (ValueError, ArithmeticError):
        return False


# ---------------------------------------------------------------------------------------------
# Answer parsing: JSON first, then a tolerant regex for near-JSON, then a bare action name.
# Never executes anything. Unparsable -> uniformly random valid action (the paper's rule).
_ACTION_FIELD = re.compile(
    r"""(?<!\w)(["']?)action\1\s*[:=]\s*(?:"([^"\n]*)"?|'([^'\n]*)'?|([^,}\n]*))""", re.IGNORECASE
)
_INDEX = re.compile(r"(\d{1,4})\s*(?:[:.)\-]\s*)?(.*)")
_MAX_JSON_TRIES = 100  # bounds the work on hostile text with many "{"


def _match_action(value, actions):
    """Index of `value` in `actions` (case-insensitive), or None. Numbers are also accepted as an
    index ("2", "2: move forward") when no action name is itself a number (MiniWorld)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return None
    s = value.strip().strip("\"'`<>. ").lower()
    names = [a.lower() for a in actions]
    if s in names:
        return names.index(s)
    if not any(a.isdigit() for a in actions):
        m = _INDEX.fullmatch(s)
        if m and int(m[1]) < len(actions) and m[2] in ("", names[int(m[1])]):
            return int(m[1])
    return None


def _find_action(text, actions):
    # 1. The first JSON object with an "action" key decides (extra text around it is fine).
    decoder = json.JSONDecoder()
    for brace in itertools.islice(re.finditer(r"\{", text), _MAX_JSON_TRIES):
        try:
            obj, _ = decoder.raw_decode(text, brace.start())
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key.strip().lower() == "action":
                    return _match_action(value, actions)
    # 2. Near-JSON: single quotes, missing brace, unquoted value. Quoted keys first, then bare.
    fields = list(itertools.islice(_ACTION_FIELD.finditer(text), _MAX_JSON_TRIES))
    for m in sorted(fields, key=lambda m: m[1] == ""):
        index = _match_action(next(g for g in m.groups()[1:] if g is not None), actions)
        if index is not None:
            return index
    # 3. The whole answer is just an action name (or index).
    return _match_action(text, actions) if len(text) < 100 else None


def parse_action(text, actions, np_random):
    """Model answer -> (action index, parse_failed). On failure a uniformly random valid action
    drawn from `np_random`. Pure apart from that draw; never raises on any str."""
    index = _find_action(text, actions) if isinstance(text, str) else None
    if index is None:
        return int(np_random.integers(len(actions))), True
    return index, False


# ---------------------------------------------------------------------------------------------
# Rendering: procedural cards with PIL, cached so a step costs about a millisecond.
# Frames must look the same on every machine: a model pre-trained on one drawing misreads another. So the font
# file ships with the repository (loaded by name it came from the machine's fonts, if any), and Pillow lays text out
# with its BASIC engine, which every Pillow has; its RAQM engine (HarfBuzz kerning) exists only where Pillow was
# built with libraqm. Measured on a machine without it: NumberLine's "Target" label shifted, 2,317 of 90,000 pixels
# differed, and the tiny model pre-trained with RAQM frames read every target as 0 (caption accuracy 1.00 -> 0.05).
FONT = Path(__file__).resolve().parent / "fonts" / "DejaVuSans-Bold.ttf"


@functools.lru_cache(maxsize=None)
def _font(size):
    return ImageFont.truetype(str(FONT), size, layout_engine=ImageFont.Layout.BASIC)


def _draw_suit(draw, suit, cx, cy, s, color):
    """Suit symbol of height ~s centred at (cx, cy), drawn from shapes (no font glyphs needed)."""
    r = s / 4
    if suit == "D":
        draw.polygon([(cx, cy - s / 2), (cx + 0.38 * s, cy), (cx, cy + s / 2), (cx - 0.38 * s, cy)], fill=color)
    elif suit == "H":
        for dx in (-r, r):
            draw.ellipse([cx + dx - r, cy - s / 2, cx + dx + r, cy - s / 2 + 2 * r], fill=color)
        draw.polygon([(cx - 2 * r, cy - s / 4 + 1), (cx + 2 * r, cy - s / 4 + 1), (cx, cy + s / 2)], fill=color)
    elif suit == "S":
        for dx in (-r, r):
            draw.ellipse([cx + dx - r, cy + s / 5 - 2 * r, cx + dx + r, cy + s / 5], fill=color)
        draw.polygon([(cx - 2 * r, cy + s / 5 - r - 1), (cx + 2 * r, cy + s / 5 - r - 1), (cx, cy - s / 2)], fill=color)
        draw.polygon([(cx, cy), (cx - s / 5, cy + s / 2), (cx + s / 5, cy + s / 2)], fill=color)
    else:  # clubs
        r = s / 5
        for dx, dy in ((0, -s / 2 + r), (-1.1 * r, -s / 2 + 2.6 * r), (1.1 * r, -s / 2 + 2.6 * r)):
            draw.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=color)
        draw.polygon([(cx, cy - r), (cx - s / 5, cy + s / 2), (cx + s / 5, cy + s / 2)], fill=color)


@functools.lru_cache(maxsize=None)
def _card_image(code, w, h):
    """A w x h card: white rounded rectangle, rank + suit in the corner, and the rank LARGE in the
    centre so it stays legible when the 300 px frame is downscaled (~112 px) for a small VLM.
    code "back" is the patterned back."""
    img = Image.new("RGB", (w, h), TABLE)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rounded_rectangle([0, 0, w - 1, h - 1], radius=max(3, w // 10), fill=255)
    face = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(face)
    if code == "back":
        draw.rectangle([4, 4, w - 5, h - 5], fill="#1f3c88")
        for k in range(-h, w + h, 8):  # diagonal lattice under a white border
            draw.line([(k, 0), (k + h, h)], fill="#8fa8e0", width=2)
            draw.line([(k, h), (k + h, 0)], fill="#8fa8e0", width=2)
        draw.rounded_rectangle([0, 0, w - 1, h - 1], radius=max(3, w // 10), outline="white", width=4)
    else:
        suit, rank = code[0], code[1]
        label = _label(rank)
        color = "#c8102e" if suit in RED_SUITS else "#111111"
        corner = max(8, h // 8)
        draw.text((max(2, w // 14), 2), label, fill=color, font=_font(corner))
        _draw_suit(draw, suit, max(2, w // 14) + corner * 0.35, 2 + corner * 1.8, corner * 0.8, color)
        size = int(0.42 * h)
        while size > 8 and _font(size).getlength(label) > 0.72 * w:
            size -= 1
        draw.text((w / 2, 0.47 * h), label, fill=color, font=_font(size), anchor="mm")
        _draw_suit(draw, suit, w / 2, 0.8 * h, 0.17 * h, color)
    draw.rounded_rectangle([0, 0, w - 1, h - 1], radius=max(3, w // 10), outline="#999999")
    img.paste(face, (0, 0), mask)
    return img


@functools.lru_cache(maxsize=32)  # one entry per deal; reused for every step of the episode
def _card_table(cards, w, h, y):
    """Green table with the given cards laid out left to right as the original (x = 5 + 1.1 i w)."""
    img = Image.new("RGB", (300, 300), TABLE)
    for i, code in enumerate(cards):
        img.paste(_card_image(code, w, h), (5 + int(i * w * 1.1), y))
    return img


def _wrap(tokens, font, width):
    """Greedy line wrap of symbols joined by spaces, so long formulas stay on the frame."""
    lines = [""]
    for token in tokens:
        candidate = f"{lines[-1]} {token}" if lines[-1] else token
        if lines[-1] and font.getlength(candidate) > width:
            lines.append(token)
        else:
            lines[-1] = candidate
    return lines


# ---------------------------------------------------------------------------------------------
# gym-cards. Each game knows its text interface: ACTIONS, prompt(), state_text(), solved().
class CardGame(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    ACTIONS = []

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(len(self.ACTIONS))
        self.observation_space = spaces.Box(0, 255, (300, 300, 3), np.uint8)

    # A Box keeps four full-size arrays (1 MB here): a pickled env (a --resume checkpoint) leaves it out.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "observation_space"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.observation_space = spaces.Box(0, 255, (300, 300, 3), np.uint8)

    def render(self):
        return np.array(self._image())  # a fresh array; the cached image is never exposed


class NumberLineEnv(CardGame):
    """Move the current number (0..5) to the target with "-" / "+"."""

    ACTIONS = ["-", "+"]

    def __init__(self, render_mode=None, max_position=5):
        super().__init__(render_mode)
        self.max_position = max_position

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position = int(self.np_random.integers(0, self.max_position + 1))
        self.goal = int(self.np_random.integers(0, self.max_position + 1))
        if self.goal == self.position:
            self.goal = (self.goal + 1) % self.max_position  # "% 5", not "% 6": as the original
        self.steps = 0
        return self.render(), self._info()

    def step(self, action):
        self.steps += 1
        before = abs(self.position - self.goal)
        if action == 0 and self.position > 0:
            self.position -= 1
        elif action == 1 and self.position < self.max_position:
            self.position += 1
        after = abs(self.position - self.goal)
        terminated = after == 0
        reward = 1.0 if terminated else (-1.0 if after >= before else 0.0)  # bumping a wall: -1
        truncated = not terminated and self.steps >= 2 * self.max_position
        return self.render(), reward, terminated, truncated, self._info()

    def _info(self):
        return {"Target": self.goal, "Current": self.position}

    def _image(self):
        return _number_line_image(self.goal, self.position)

    def state_text(self):
        return f"Target: {self.goal}, Current: {self.position}"

    def solved(self, reward, terminated):
        return terminated

    def prompt(self):
        return (
            "You are playing a game called number line. You will see a target number and a current number "
            "in the image. Your goal is to move the current number closer to the target by choosing either "
            'adding or subtracting one to the current number. You can return one of two actions: "-" or "+". '
            "Your response should be a valid json in the following format:\n"
            '{"thoughts": "<read the target and the current number, then decide>", "action": "-" or "+"}'
        )


@functools.lru_cache(maxsize=64)
def _number_line_image(goal, position):
    img = Image.new("RGB", (300, 300), "white")
    draw = ImageDraw.Draw(img)
    draw.text((30, 60), f"Target: {goal}", fill="black", font=_font(36))
    draw.text((30, 180), f"Current: {position}", fill="black", font=_font(36))
    return img


class PointsGame(CardGame):
    """Append numbers and operators to a formula; "=" scores it. Shared by EZPoints and Points24."""

    TARGET, N_CARDS, MAX_LEN = 0, 0, 0
    CARD_SIZE, CARD_Y, FONT = (0, 0), 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cards, self.numbers = self._deal()
        self.formula, self.used = [], []
        return self.render(), self._info()

    def step(self, action):
        symbol = self.ACTIONS[action]
        if len(self.formula) > self.MAX_LEN:  # too long: truncated, the action is ignored
            return self.render(), -1.0, False, True, self._info()
        if symbol.isdigit():
            number = int(symbol)
            if self.used.count(number) >= self.numbers.count(number):
                self.formula.append(" ")  # a card used twice: the formula still grows (so does the limit)
                return self.render(), -1.0, False, False, self._info()
            self.used.append(number)
        if symbol == "=":
            solved = formula_equals(self.formula, self.TARGET) and len(self.used) == self.N_CARDS
            return self.render(), 10.0 if solved else -1.0, True, False, self._info()
        self.formula.append(int(symbol) if symbol.isdigit() else symbol)
        return self.render(), 0.0, False, False, self._info()

    def _info(self):  # copies: the original handed out its live lists
        return {"Cards": list(self.cards), "Numbers": list(self.numbers), "Formula": list(self.formula)}

    def _card(self, rank):
        return "CDHS"[int(self.np_random.integers(4))] + RANKS[rank - 1]

    def _image(self):
        w, h = self.CARD_SIZE
        img = _card_table(tuple(self.cards), w, h, self.CARD_Y).copy()
        draw = ImageDraw.Draw(img)
        for xy, line in self._formula_lines():
            draw.text(xy, line, fill="white", font=_font(self.FONT))
        return img

    def state_text(self):
        return f"{self.cards_text()} Formula: {' '.join(map(str, self.formula))}".rstrip()

    def cards_text(self):
        """The cards alone, e.g. "Cards: 5, K." (what the tiny model is taught to read; the prompt has the formula)."""
        return f"Cards: {', '.join(_label(c[1]) for c in self.cards)}."

    def solved(self, reward, terminated):
        return reward == 10

    def prompt(self):
        formula = "".join(map(str, self.formula))
        count = "two" if self.N_CARDS == 2 else "four"
        return (
            f"You are an expert card game player. You are observing {count} cards in the image. "
            f"The current formula is: {formula if formula else '(empty)'}. "
            f"You can choose between {self.ACTIONS}. You should choose only one symbol from the given list. "
            "The chosen symbol will be appended to the current formula. Note that 'J', 'Q', and 'K' count as '10'. "
            f"Your goal is to output a formula that evaluates to {self.TARGET}, and each card can only be used once. "
            "If the current formula is complete, output '='. Otherwise consider which number or operator should "
            f"be appended to the current formula to make it equal {self.TARGET}. "
            "Your response should be a valid json in the following format:\n"
            '{"thoughts": "<concise thoughts that lead to the goal>", "action": "<your chosen symbol>"}'
        )


class EZPointsEnv(PointsGame):
    """Make 12 from two cards with "+" and "*" (the gym-cards task the paper reports)."""

    ACTIONS = [str(n) for n in range(1, 11)] + ["+", "*", "="]
    TARGET, N_CARDS, MAX_LEN = 12, 2, 5
    CARD_SIZE, CARD_Y, FONT = (135, 189), 55, 20

    def _deal(self):  # always solvable: the second card completes 12 by "+" or (half the time) "*"
        rank = int(self.np_random.integers(2, 14))
        cards, numbers = [self._card(rank)], [min(rank, 10)]
        v1 = numbers[0]
        numbers.append(12 // v1 if v1 in (1, 2, 3, 4, 6) and self.np_random.random() <= 0.5 else 12 - v1)
        cards.append(self._card(numbers[1]))  # the second card shows its value: 10 is a "T", never J/Q/K
        if self.np_random.random() <= 0.5:
            cards, numbers = cards[::-1], numbers[::-1]
        return cards, numbers

    def _formula_lines(self):
        lines = _wrap(["Formula:"] + [str(s) for s in self.formula], _font(self.FONT), 285)
        return [((10, 258 + 22 * i), line) for i, line in enumerate(lines)]


def ezpoints_expert(game):
    """The weak prior's EZPoints action, from the true deal (game.numbers, left card first): the next symbol of a
    correct formula ("left op right", or "right op left" once the formula starts with the right card) and "=" once
    it is complete; None when the formula so far is no prefix of a correct one (nothing can still make 12)."""
    a, b = game.numbers
    candidates = [[x, op, y] for x, y in ((a, b), (b, a)) for op in ("+", "*")]
    for formula in (f for f in candidates if formula_equals(f, game.TARGET)):
        done = len(game.formula)
        if game.formula == formula[:done]:
            return game.ACTIONS.index(str(formula[done]) if done < len(formula) else "=")
    return None


class Points24Env(PointsGame):
    """Make 24 from four cards with + - * / ( ). About 73% of deals are solvable."""

    ACTIONS = [str(n) for n in range(1, 11)] + ["+", "-", "*", "/", "(", ")", "="]
    TARGET, N_CARDS, MAX_LEN = 24, 4, 20
    CARD_SIZE, CARD_Y, FONT = (67, 93), 103, 16

    def _deal(self):
        ranks = [int(r) for r in self.np_random.integers(1, 14, size=4)]
        return [self._card(r) for r in ranks], [min(r, 10) for r in ranks]

    def _formula_lines(self):
        lines = _wrap([str(s) for s in self.formula], _font(self.FONT), 285)
        return [((10, 210), "Formula:")] + [((10, 240 + 20 * i), line) for i, line in enumerate(lines)]


def sum_hand(hand):
    """Blackjack total of (value, rank, suit) cards; an ace counts 11 when that does not bust."""
    total = sum(card[0] for card in hand)
    return total + 10 if any(card[0] == 1 for card in hand) and total + 10 <= 21 else total


class BlackjackEnv(CardGame):
    """gymnasium Blackjack-v1 rules (natural=False, sab=False) on a 300x300 image. 0 = stand, 1 = hit.
    As the original, the image never reveals the dealer's hole card; info holds both hands."""

    ACTIONS = ["stand", "hit"]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.dealer = [self._draw(), self._draw()]
        self.player = [self._draw(), self._draw()]
        return self.render(), self._info()

    def _draw(self):  # infinite deck: (value, rank, suit), J/Q/K worth 10
        rank = int(self.np_random.integers(1, 14))
        return (min(rank, 10), RANKS[rank - 1], "CDHS"[int(self.np_random.integers(4))])

    def step(self, action):
        if action == 1:  # hit
            self.player.append(self._draw())
            terminated = sum_hand(self.player) > 21
            reward = -1.0 if terminated else 0.0
        else:  # stand: the dealer draws to 17 (stands on soft 17), then the higher score wins
            while sum_hand(self.dealer) < 17:
                self.dealer.append(self._draw())
            player, dealer = (s if s <= 21 else 0 for s in (sum_hand(self.player), sum_hand(self.dealer)))
            terminated, reward = True, float((player > dealer) - (player < dealer))
        return self.render(), reward, terminated, False, self._info()

    def _info(self):
        return {"Dealer Card": list(self.dealer), "Player Card": list(self.player)}

    def _image(self):
        return _blackjack_image(self.dealer[0][2] + self.dealer[0][1], tuple(c[2] + c[1] for c in self.player))

    def state_text(self):  # only what the image shows: the dealer's up card and the player's cards
        return f"Dealer: {_label(self.dealer[0][1])}. Player: {', '.join(_label(c[1]) for c in self.player)}."

    def solved(self, reward, terminated):
        return terminated and reward > 0

    def prompt(self):
        return (
            "You are a blackjack player. You are observing the current game state: the dealer's face-up card "
            "and your cards. You can choose between ['stand', 'hit']. "
            "Your response should be a valid json in the following format:\n"
            '{"thoughts": "<first describe your total points and the dealer\'s total points, then think about '
            'which action to choose>", "action": "stand" or "hit"}'
        )


@functools.lru_cache(maxsize=64)
def _blackjack_image(dealer_up, player):
    img = Image.new("RGB", (300, 300), TABLE)
    draw = ImageDraw.Draw(img)
    draw.text((5, 5), "Dealer", fill="white", font=_font(16))
    img.paste(_card_image(dealer_up, 70, 98), (5, 25))
    img.paste(_card_image("back", 70, 98), (78, 25))
    draw.text((5, 130), "Player", fill="white", font=_font(16))
    # One row; cards shrink once there are more than four, so every card stays visible.
    w = min(70, (290 - 4 * (len(player) - 1)) // len(player))
    for i, code in enumerate(player):
        img.paste(_card_image(code, w, int(w * 1.4)), (5 + i * (w + 4), 150))
    return img


for _id, _cls in zip(CARD_IDS, [NumberLineEnv, EZPointsEnv, Points24Env, BlackjackEnv]):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_cls, max_episode_steps=300)  # 300 as the original registry


# ---------------------------------------------------------------------------------------------
# MiniWorld: the text side (task prompt, what is in view). The worlds come from the miniworld package.
MINIWORLD_TASKS = {
    "MiniWorld-OneRoom-v0": "go to the red box placed randomly in one big room",
    "MiniWorld-Hallway-v0": "go to the red box at the end of a hallway",
    "MiniWorld-FourRooms-v0": "go to the red box in one of four connected rooms",
    "MiniWorld-WallGap-v0": "go to the red box behind a wall; there is a gap in the wall",
}


def _cross(u, v):
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _walls_block(a, b, segs):
    """Does the segment a->b (x, z) cross any wall segment? segs: (N, 2, 2)."""
    d, p, e = b - a, segs[:, 0], segs[:, 1] - segs[:, 0]
    denom = _cross(d, e)
    ok = np.abs(denom) > 1e-9
    t = _cross(p - a, e) / np.where(ok, denom, 1.0)
    u = _cross(p - a, d) / np.where(ok, denom, 1.0)
    return bool(np.any(ok & (t > 1e-6) & (t < 1 - 1e-6) & (u >= 0) & (u <= 1)))


def miniworld_view_text(world):
    """Where the red box is in the agent's view: "red box ahead left, far" / "no red box in view".
    Geometry in the floor plane: the camera's horizontal field of view, walls as occluders (a ray to
    the box centre or either side edge must be clear). Coarse buckets: straight ahead within 15 deg,
    near < 2.5 m, mid < 5 m, far beyond. Other entities (none in these four tasks) are ignored."""
    a, box = world.agent.pos[[0, 2]], world.box
    forward, right = world.agent.dir_vec[[0, 2]], world.agent.right_vec[[0, 2]]
    h, w = world.observation_space.shape[:2]
    half_fov = math.degrees(math.atan(math.tan(math.radians(world.agent.cam_fov_y / 2)) * w / h))
    centre = box.pos[[0, 2]]
    offset = centre - a
    dist = float(np.linalg.norm(offset))
    side = np.array([-offset[1], offset[0]]) / max(dist, 1e-9) * box.radius * 0.9
    segs = world.wall_segs[:, :, [0, 2]]

    def seen(point):
        v = point - a
        angle = math.degrees(math.atan2(v @ right, v @ forward))
        return v @ forward > 0 and abs(angle) <= half_fov and not _walls_block(a, point, segs)

    if not any(seen(p) for p in (centre, centre + side, centre - side)):
        return "no red box in view"
    angle = box_bearing(world)
    where = "straight ahead" if abs(angle) <= 15 else ("ahead right" if angle > 0 else "ahead left")
    return f"red box {where}, {'near' if dist < 2.5 else 'mid' if dist < 5 else 'far'}"


def box_bearing(world):
    """Degrees from the agent's heading to the red box's centre in the floor plane; > 0: right of centre."""
    offset = world.box.pos[[0, 2]] - world.agent.pos[[0, 2]]
    return math.degrees(math.atan2(offset @ world.agent.right_vec[[0, 2]], offset @ world.agent.dir_vec[[0, 2]]))


def miniworld_expert(world):
    """The weak prior's MiniWorld action, from the simulator's true state (never the pixels): move forward when the
    red box is straight ahead, turn towards it when it is ahead left or right, turn left when it is not in view. "In
    view" and "straight ahead" are miniworld_view_text's (the camera's field of view, walls as occluders; 15
    degrees), so the action is a function of the caption. Walls are not planned around: FourRooms and WallGap,
    whose box is often out of sight, are mostly left to exploration."""
    view = miniworld_view_text(world)
    if view == "no red box in view":
        return 0  # turn left
    return 2 if view.startswith("red box straight ahead") else (1 if view.startswith("red box ahead right") else 0)


_GL_HELP = (
    "MiniWorld could not create a headless OpenGL context ({e}); install Mesa EGL "
    "(apt-get install libegl1 libgl1-mesa-dri) and keep PYGLET_HEADLESS=True"
)


def _import_miniworld():
    try:
        import miniworld  # noqa: F401  (registers MiniWorld-* and opens a hidden GL context)
    except ModuleNotFoundError as e:
        if e.name != "miniworld":
            raise
        raise RuntimeError("MiniWorld is not installed: pip install 'miniworld>=2.1,<3'") from e
    except Exception as e:
        raise RuntimeError(_GL_HELP.format(e=f"{type(e).__name__}: {e}".splitlines()[0])) from e


# ---------------------------------------------------------------------------------------------
class TextEnv(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """What a VLM agent sees and does: the last K frames and a prompt in, its raw answer out.

    step(answer) parses the answer (an int is taken as the action index directly, for scripted
    baselines) and adds info["action"], info["parse_failed"], info["success"]. An unparsable answer
    plays a uniformly random valid action; with invalid_action_penalty set, that penalty is also
    added to the reward."""

    unsolved_penalty = 0.0  # added when an episode ends unsolved (MiniWorld: -1)

    def __init__(self, env, actions, num_frames=1, text_obs=False, invalid_action_penalty=None):
        gym.utils.RecordConstructorArgs.__init__(self, actions=actions, num_frames=num_frames, text_obs=text_obs,
                                                 invalid_action_penalty=invalid_action_penalty)
        gym.Wrapper.__init__(self, env)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.actions = list(actions)
        self.num_frames, self.text_obs, self.invalid_action_penalty = num_frames, text_obs, invalid_action_penalty
        self.action_space = spaces.Discrete(len(self.actions))
        self.observation_space = spaces.Box(0, 255, (num_frames,) + env.observation_space.shape, np.uint8)
        self.frames = deque(maxlen=num_frames)
        self.steps_taken = 0
        # Its own generator for random actions, so answers never change what the world deals next.
        self.answer_rng = np.random.default_rng()

    def __getstate__(self):  # as CardGame's: the stacked Box is rebuilt, not pickled
        return {k: v for k, v in self.__dict__.items() if k != "_observation_space"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._observation_space = spaces.Box(0, 255, (self.num_frames,) + self.env.observation_space.shape, np.uint8)

    def reset(self, *, seed=None, options=None):
        frame, info = self.env.reset(seed=seed, options=options)
        if seed is not None:
            self.answer_rng = np.random.default_rng([seed, 0x7E57])  # seeded, distinct from the world's stream
        self.frames.clear()
        self.frames.extend([frame] * self.num_frames)  # a new episode: every slot is the first frame
        self.steps_taken = 0
        return np.stack(self.frames), info

    def step(self, answer):
        if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
            if not 0 <= answer < len(self.actions):
                raise ValueError(f"action {answer} out of range 0..{len(self.actions) - 1}")
            action, failed = int(answer), False
        else:
            action, failed = parse_action(answer, self.actions, self.answer_rng)
        frame, reward, terminated, truncated, info = self.env.step(action)
        self.frames.append(frame)
        self.steps_taken += 1
        success = bool(self._solved(reward, terminated))
        reward = float(reward)
        if (terminated or truncated) and not success:
            reward += self.unsolved_penalty
        if failed and self.invalid_action_penalty is not None:
            reward += self.invalid_action_penalty
        info = dict(info, action=action, parse_failed=failed, success=success)
        return np.stack(self.frames), reward, terminated, truncated, info

    def prompt(self):
        """The task prompt for the current state (no image placeholders)."""
        text = self._task_prompt()
        if self.text_obs:
            text += f"\n\nText observation (the state shown in the last image): {self.state_text()}"
        return text

    # The game-specific parts; gym-cards games carry their own.
    def state_text(self):
        return self.env.unwrapped.state_text()

    def _task_prompt(self):
        return self.env.unwrapped.prompt()

    def _solved(self, reward, terminated):
        return self.env.unwrapped.solved(reward, terminated)


class MiniWorldTextEnv(TextEnv):
    """MiniWorld as in the paper: 4 actions (move back included), -1 when an episode ends without
    reaching the box, success = episode return > 0 (i.e. the box was reached)."""

    unsolved_penalty = -1.0

    def __init__(self, env, env_id, shaping=0.0, **kwargs):
        # recorded first, so that TextEnv's own record (the action list) is skipped: the spec rebuilds this class
        gym.utils.RecordConstructorArgs.__init__(self, env_id=env_id, shaping=shaping, **kwargs)
        super().__init__(env, MINIWORLD_ACTIONS, **kwargs)
        self.task = MINIWORLD_TASKS[env_id]
        self.max_steps = env.spec.max_episode_steps
        self.shaping = shaping

    def step(self, answer):
        """The paper's sparse reward, plus potential-based shaping Phi(s') - Phi(s) when shaping > 0 (not the
        paper's: a diagnostic). info["success"] is decided on the env's own reward, before the shaping."""
        before = self.potential()
        observation, reward, terminated, truncated, info = super().step(answer)
        return observation, reward + self.potential() - before, terminated, truncated, info

    def potential(self):
        """Phi(s) = -shaping * (metres to the red box + degrees between heading and box / 100): one forward step
        (0.15 m) or one turn (15 degrees) towards the box raises it alike. Over an episode the shaping sums to
        Phi(last) - Phi(first), so no path earns more than another that ends in the same place."""
        if not self.shaping:
            return 0.0
        world = self.env.unwrapped
        metres = float(np.linalg.norm(world.box.pos[[0, 2]] - world.agent.pos[[0, 2]]))
        return -self.shaping * (metres + abs(box_bearing(world)) / 100)

    def state_text(self):
        return miniworld_view_text(self.env.unwrapped)

    def _solved(self, reward, terminated):
        return terminated and reward > 0

    def _task_prompt(self):
        now = f"You have taken {self.steps_taken} actions so far" if self.steps_taken else "This is the starting state"
        views = f"The images are your last {self.num_frames} views, oldest first; the last one is the current view. "
        return (
            "You are operating in a 3-D simulator. Reaching the goal ends the episode with a reward; "
            f"not reaching it within {self.max_steps} actions gives -1.\n"
            f"TASK: {self.task}, in as few steps as possible.\n"
            + (views if self.num_frames > 1 else "")
            + f"{now}. Take ONE action. If you cannot see the red box, turn around or explore to find it.\n"
            "# Available actions:\n"
            + "".join(f"{i}: {name}\n" for i, name in enumerate(self.actions))
            + "Think about what you see and which action brings you closer to the red box. "
            "The output format should be as follows:\n"
            '{"thoughts": <your thoughts>, "action": <action number>}'
        )


def make_env(env_id, num_frames=None, text_obs=False, invalid_action_penalty=None, frame_size=(80, 60), shaping=0.0):
    """A TextEnv for one of ENV_IDS. num_frames: None = 4 for MiniWorld, 1 for gym-cards.
    frame_size = (width, height) and shaping (MiniWorldTextEnv.potential's coefficient), MiniWorld only."""
    if env_id not in ENV_IDS:
        raise ValueError(f"unknown env_id {env_id!r}; valid ids: {', '.join(ENV_IDS)}")
    if shaping and env_id in CARD_IDS:
        raise ValueError(f"reward shaping is for MiniWorld only, not {env_id}")
    kwargs = dict(text_obs=text_obs, invalid_action_penalty=invalid_action_penalty)
    if env_id in CARD_IDS:
        env = gym.make(env_id)
        return TextEnv(env, env.unwrapped.ACTIONS, num_frames=1 if num_frames is None else num_frames, **kwargs)
    _import_miniworld()
    try:  # quiet: MiniWorld prints "Falling back to num_samples=4" for every window it cannot multisample 16x
        with contextlib.redirect_stdout(io.StringIO()):
            env = gym.make(env_id, render_mode="rgb_array", max_episode_steps=MINIWORLD_MAX_STEPS,
                           obs_width=frame_size[0], obs_height=frame_size[1])
    except Exception as e:  # the framebuffer is created here; a broken GL stack fails here
        raise RuntimeError(_GL_HELP.format(e=f"{type(e).__name__}: {e}".splitlines()[0])) from e
    return MiniWorldTextEnv(env, env_id, shaping=shaping, num_frames=4 if num_frames is None else num_frames, **kwargs)


def expert_action(env):
    """The weak prior's action in a TextEnv's current state (miniworld_expert, ezpoints_expert), or None: the env
    has no expert (NumberLine, Points24, Blackjack) or, in EZPoints, no correct formula is left."""
    if isinstance(env, MiniWorldTextEnv):
        return miniworld_expert(env.unwrapped)
    if isinstance(env.unwrapped, EZPointsEnv):
        return ezpoints_expert(env.unwrapped)
    return None
