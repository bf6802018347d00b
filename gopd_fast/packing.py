"""Pack whole episodes into rows so each model scores an episode in ONE forward pass.

An episode is the full multi-turn history (prompt, turn 1, observation 1, turn 2, ...). Scoring it turn by turn
would re-prefill the growing history at every turn: O(turns^2) tokens. Packing the whole episode scores every
token once: O(turns). Several episodes share a row (first-fit decreasing by length); each restarts its
``position_ids`` at 0, and that reset is what isolates them:

* flash-attention 2 (GPU) turns the resets into ``cu_seqlens`` for its varlen kernel;
* SDPA / eager (transformers >= 5) build a block-diagonal causal mask from the resets when the forward gets
  ``attention_mask=None`` and ``use_cache=False``, which is how the trainer calls the models.

So the same packed layout is exact for every attention backend (tests/test_packing.py checks packed hidden
states against one forward per episode). Row tails are padding: their own segment, never a loss target.

Targets are shifted: the hidden state at position t predicts token t+1, so ``target_roles[t]`` is the role of
token t+1 and the last token of each episode (and padding) predicts nothing (``Role.CONTEXT``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gopd_fast.rollout.episode import Episode, Role


@dataclass
class PackedBatch:
    input_ids: torch.Tensor        # [R, L] long
    position_ids: torch.Tensor     # [R, L] long, restarts at 0 at every episode (and the padding tail)
    target_ids: torch.Tensor       # [R, L] long: token t+1 of the same episode (pad id where none)
    target_roles: torch.Tensor     # [R, L] long: Role of token t+1; CONTEXT where it carries no loss
    sample_logprobs: torch.Tensor  # [R, L] float32: sampling log-prob of token t+1 (0 where not generated)
    episode_index: torch.Tensor    # [R, L] long: index into the input episode list, -1 on padding
    num_episodes: int

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens, i.e. positions each model scores."""
        return int((self.episode_index >= 0).sum())

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.target_roles != Role.CONTEXT

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(*(getattr(self, f).to(device) for f in
                             ("input_ids", "position_ids", "target_ids", "target_roles", "sample_logprobs",
                              "episode_index")), num_episodes=self.num_episodes)


def plan_rows(lengths: Sequence[int], max_tokens_per_row: int) -> list[list[int]]:
    """First-fit decreasing: episode indices per row. An episode longer than the budget gets a row alone."""
    if max_tokens_per_row < 1:
        raise ValueError(f"max_tokens_per_row must be >= 1, got {max_tokens_per_row}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_tokens_per_row - n)
    return rows


def pack_episodes(episodes: Sequence[Episode], max_tokens_per_row: int, pad_id: int,
                  pad_to_multiple_of: int = 8) -> PackedBatch:
    """Pack ``episodes`` into a ``PackedBatch`` (rows padded to a common, rounded-up length)."""
    if not episodes:
        raise ValueError("pack_episodes needs at least one episode")
    for i, ep in enumerate(episodes):
        if len(ep.token_ids) < 2:
            raise ValueError(f"episode {i} ({ep.task_id!r}) has {len(ep.token_ids)} tokens; need >= 2")
    rows = plan_rows([len(e.token_ids) for e in episodes], max_tokens_per_row)
    width = max(sum(len(episodes[i].token_ids) for i in row) for row in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    target_ids = torch.full(shape, pad_id, dtype=torch.long)
    target_roles = torch.full(shape, int(Role.CONTEXT), dtype=torch.long)
    sample_logprobs = torch.zeros(shape, dtype=torch.float32)
    episode_index = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            ep = episodes[i]
            n = len(ep.token_ids)
            ids = torch.tensor(ep.token_ids, dtype=torch.long)
            input_ids[r, col:col + n] = ids
            position_ids[r, col:col + n] = torch.arange(n)
            target_ids[r, col:col + n - 1] = ids[1:]
            target_roles[r, col:col + n - 1] = torch.tensor(ep.roles[1:], dtype=torch.long)
            sample_logprobs[r, col:col + n - 1] = torch.tensor(ep.logprobs[1:], dtype=torch.float32)
            episode_index[r, col:col + n] = i
            col += n
        position_ids[r, col:] = torch.arange(width - col)   # the padding tail is a segment of its own
    return PackedBatch(input_ids, position_ids, target_ids, target_roles, sample_logprobs, episode_index,
                       num_episodes=len(episodes))


def pack_token_states(batch: PackedBatch, states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-token vectors of each episode (``states[i]``: [len(episode i), d], e.g. a model's final hidden states)
    laid out as ``batch``'s rows: [R, L, d], zeros on padding. ``states`` follow the episode list ``batch`` was
    packed from."""
    if len(states) != batch.num_episodes:
        raise ValueError(f"states must hold one tensor per packed episode ({batch.num_episodes}), got {len(states)}")
    index = batch.episode_index.reshape(-1)
    real = index >= 0
    counts = torch.bincount(index[real], minlength=batch.num_episodes).tolist()
    for i, (x, n) in enumerate(zip(states, counts)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != n:
            raise ValueError(f"states[{i}] must be a [{n}, d] tensor (one row per token of episode {i}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != states[0].shape[1] or x.dtype != states[0].dtype:
            raise ValueError(f"states[{i}] is {x.dtype} [.., {x.shape[1]}] but states[0] is {states[0].dtype} "
                             f"[.., {states[0].shape[1]}]: all must share the width and dtype")
    # rows are filled episode after episode, each episode's tokens in order: the real positions in row-major order
    # are the episodes' tokens in the order they were placed
    order = torch.unique_consecutive(index[real]).tolist()
    out = states[0].new_zeros(index.numel(), states[0].shape[1])
    out[real.to(out.device)] = torch.cat([states[i] for i in order])
    return out.view(*batch.episode_index.shape, -1)


def shard_episodes(episodes: Sequence[Episode], rank: int, world_size: int) -> list[Episode]:
    """This rank's share of a global batch: balanced by token count (longest first, to the lightest rank)."""
    load = [0] * world_size
    owner = [0] * len(episodes)
    for i in sorted(range(len(episodes)), key=lambda i: (-len(episodes[i].token_ids), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += len(episodes[i].token_ids)
    return [ep for i, ep in enumerate(episodes) if owner[i] == rank]


def whole_episode_tokens(episode: Episode) -> int:
    """Positions scored per model when the episode is one packed sequence: every token once."""
    return len(episode.token_ids)


def per_turn_reprefill_tokens(episode: Episode) -> int:
    """Positions scored per model if each turn were scored separately with its whole history re-prefilled."""
    return sum(end for _start, end in episode.turn_spans)
