"""The environment's oracle as a writer of turns: token-exact expert episodes and the oracle's text.

One owner for how an oracle run is rendered: the trainer's ``rollout.engine = "expert"`` source
(``gopd_fast.train_setup.ExpertSource``) and the demo's SFT data (``gopd_fast.demo``) both call
``oracle_episodes``; the tokenizer text of the tiny models (``train_setup.ensure_tiny_models``, the demo's
teacher) comes from ``oracle_text``; ``random_episodes`` (the demo study's chance-level student base data) is
rendered by the same ``_play``.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from gopd_fast.envs.base import TextEnv
from gopd_fast.rollout.episode import Episode, Role
from gopd_fast.rollout.history import ChatFormat, History

__all__ = ["ACTION_FORMAT", "oracle_episodes", "oracle_text", "random_episodes"]

# How an action is written as an assistant turn: the ReAct "Action:" line that the rollout's default
# ActionParser (gopd_fast.rollout.guidance.DEFAULT_ACTION_PATTERN) reads back.
ACTION_FORMAT = "Action: {action}"


def _check_noise(noise: float) -> None:
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise!r}")


def _check_oracle(env: TextEnv, noise: float) -> None:
    _check_noise(noise)
    if env.expert_action.__func__ is TextEnv.expert_action:  # type: ignore[attr-defined]
        raise ValueError(f"environment {env.name!r} has no oracle (expert_action)")


def oracle_episodes(
    env: TextEnv,
    tasks: Sequence[str],
    chat: ChatFormat,
    *,
    noise: float = 0.0,
    seed: int = 0,
    action_format: str = ACTION_FORMAT,
    eos_token_id: int | None = None,
) -> list[Episode]:
    """Roll the environment's oracle over ``tasks`` and render each episode token-exactly through ``chat``.

    Each expert turn is the tokens of ``action_format`` + the tokenizer's eos (how a model ends its turn), appended
    with the same ``History`` the rollout uses, so training data and rollouts share one token layout.

    ``noise``: probability that a turn takes a random admissible non-expert action instead (DAgger-style data:
    the later expert turns then label the *recovery* from an off-path state). Noise turns are recorded with
    ``Role.STUDENT`` so training on ``Role.TEACHER`` tokens only never imitates them. ``noise=0`` gives
    pure expert-path demonstrations (a teacher that has never seen a mistake). ``eos_token_id`` ends each turn
    (default: the tokenizer's eos).
    """
    _check_oracle(env, noise)
    rng = random.Random(seed)

    def choose(expert: str | None, admissible: Sequence[str]) -> tuple[str, int] | None:
        if expert is None:
            return None
        if noise > 0 and admissible and rng.random() < noise:
            others = [a for a in admissible if a != expert and a not in ("look", "inventory")]
            if others:
                return rng.choice(others), Role.STUDENT
        return expert, Role.TEACHER

    return [_play(env, task_id, chat, choose, action_format, eos_token_id, {"source": "oracle", "noise": noise},
                  uses_expert=True) for task_id in tasks]


def random_episodes(
    env: TextEnv,
    tasks: Sequence[str],
    chat: ChatFormat,
    *,
    seed: int = 0,
    action_format: str = ACTION_FORMAT,
    eos_token_id: int | None = None,
) -> list[Episode]:
    """Episodes of a uniformly random admissible action every turn (until the env's turn limit or success).

    Data that teaches the action format and the env's text but no policy better than chance: a student base
    SFT-ed on it has learned nothing from a source better than any teacher. Turns are ``Role.STUDENT``.
    """
    rng = random.Random(seed)

    def choose(expert: str | None, admissible: Sequence[str]) -> tuple[str, int] | None:
        if not admissible:
            raise ValueError(f"environment {env.name!r} gave no admissible actions: random_episodes needs them")
        return rng.choice(list(admissible)), Role.STUDENT

    return [_play(env, task_id, chat, choose, action_format, eos_token_id, {"source": "random"},
                  uses_expert=False) for task_id in tasks]


def _play(env: TextEnv, task_id: str, chat: ChatFormat,
          choose: Callable[[str | None, Sequence[str]], tuple[str, int] | None], action_format: str,
          eos_token_id: int | None, info: dict, *, uses_expert: bool) -> Episode:
    """One episode in which ``choose(expert_action, admissible)`` picks each turn's (action, role); None ends it.
    ``uses_expert=False`` skips the oracle query (passes None). The one renderer of scripted episodes: each turn
    is ``action_format`` + eos, appended token-exactly with the rollout's ``History``."""
    tok = chat.tokenizer
    eos = [int(tok.eos_token_id if eos_token_id is None else eos_token_id)]
    first = env.reset(task_id)
    history = History(chat.initial_prompt(first.prompt))
    actions: list[str] = []
    admissible = first.admissible_actions
    score, success = 0.0, False
    while True:
        picked = choose(env.expert_action() if uses_expert else None, admissible)
        if picked is None:
            break
        action, role = picked
        response = list(tok(action_format.format(action=action), add_special_tokens=False)["input_ids"]) + eos
        history.add_response(response, [0.0] * len(response), role)
        actions.append(action)
        step = env.step(action)
        score, success, admissible = step.score, step.success, step.admissible_actions
        if step.done:
            break
        history.add_observation(chat.piece_after(response, step.observation))
    return Episode(
        task_id=task_id, token_ids=history.token_ids, roles=history.roles, logprobs=history.logprobs,
        turn_spans=history.turn_spans, turn_roles=history.turn_roles, actions=actions, score=score,
        success=success, rounds=len(actions), beta=1.0, info=dict(info),
    )


def oracle_text(env: TextEnv, tasks: Sequence[str], *, noise: float = 0.0, seed: int = 0,
                action_format: str = ACTION_FORMAT) -> list[str]:
    """The observations and ``action_format`` lines of oracle runs over ``tasks``: a tokenizer's training text.

    ``noise``: probability that a turn takes a random admissible action instead (any of them), so the tokenizer
    also sees refusals and off-path rooms. The env's oracle then plans from the state that action left. An env
    without an oracle gives the first observation of each task only.
    """
    _check_noise(noise)
    rng = random.Random(seed)
    texts: list[str] = []
    for task_id in tasks:
        first = env.reset(task_id)
        texts.append(first.observation)
        admissible, done = first.admissible_actions, False
        while not done and (action := env.expert_action()) is not None:
            if admissible and rng.random() < noise:
                action = rng.choice(list(admissible))
            step = env.step(action)
            texts += [action_format.format(action=action), step.observation]
            admissible, done = step.admissible_actions, step.done
    return texts
