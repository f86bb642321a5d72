"""A small token tree MDP with an exact soft-optimal solution (docs/algorithm.md section 4).

Tokens 0..K-1, token 0 is EOS. A state is the tuple of tokens so far; an episode ends at EOS
or after `depth` tokens (the length limit is terminal here, V_H = 0, matching the default
`truncated_response: zero` treatment). Every transition (s, a) carries a random reward:
terminal ones in [0, 1], intermediate ones small, so dense rewards are exercised too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class TokenTree:
    vocab: int
    depth: int
    states: list[tuple[int, ...]]  # non-terminal states, index = row of the tables below
    log_ref: torch.Tensor  # [S, K] log pi_ref(a|s)
    log_behaviour: torch.Tensor  # [S, K] log mu(a|s), differs from pi_ref
    reward: torch.Tensor  # [S, K] r(s, a)
    beta: float

    def index(self, state: tuple[int, ...]) -> int:
        return self._index[state]

    def __post_init__(self) -> None:
        self._index = {s: i for i, s in enumerate(self.states)}

    def is_terminal(self, state: tuple[int, ...]) -> bool:
        return len(state) == self.depth or (len(state) > 0 and state[-1] == 0)

    def soft_optimal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft value iteration (exact, backwards over depth): returns (pi* [S, K], V* [S])."""
        v = torch.zeros(len(self.states), dtype=torch.float64)
        q = torch.zeros(len(self.states), self.vocab, dtype=torch.float64)
        for i in sorted(range(len(self.states)), key=lambda i: -len(self.states[i])):
            s = self.states[i]
            for a in range(self.vocab):
                nxt = s + (a,)
                q[i, a] = self.reward[i, a] + (0.0 if self.is_terminal(nxt) else v[self.index(nxt)])
            v[i] = self.beta * torch.logsumexp(self.log_ref[i] + q[i] / self.beta, dim=0)
        pi = torch.exp(self.log_ref + (q - v[:, None]) / self.beta)
        return pi, v


def random_tree(vocab: int, depth: int, beta: float, seed: int) -> TokenTree:
    gen = torch.Generator().manual_seed(seed)
    states = [()]
    for length in range(1, depth):
        states += [s for s in itertools.product(range(1, vocab), repeat=length)]
    n = len(states)
    log_ref = torch.log_softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1)
    # Behaviour: a different random policy, mixed with uniform so every (s, a) is covered.
    mu = 0.7 * torch.softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1)
    log_behaviour = torch.log(mu + 0.3 / vocab)
    reward = 0.2 * (torch.rand(n, vocab, generator=gen, dtype=torch.float64) - 0.5)
    tree = TokenTree(vocab, depth, states, log_ref, log_behaviour, reward, beta)
    for i, s in enumerate(states):  # terminal transitions get outcome rewards in [0, 1]
        for a in range(vocab):
            if tree.is_terminal(s + (a,)):
                reward[i, a] = torch.rand((), generator=gen, dtype=torch.float64)
    return tree


def sample_dataset(tree: TokenTree, n: int, seed: int, left_pad_every: int = 3):
    """n trajectories from mu as padded tensors (some rows left-padded, the rest right-padded).

    Returns dict of [n, depth] tensors: state_idx, action, reward, ref_lp, behaviour_lp, mask.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        s, traj = (), []
        while not tree.is_terminal(s):
            i = tree.index(s)
            a = int(torch.multinomial(tree.log_behaviour[i].exp(), 1, generator=gen))
            traj.append((i, a))
            s = s + (a,)
        rows.append(traj)
    t = tree.depth
    out = {k: torch.zeros(n, t, dtype=torch.long) for k in ("state_idx", "action")}
    out |= {k: torch.zeros(n, t, dtype=torch.float64) for k in ("reward", "ref_lp", "behaviour_lp")}
    out["mask"] = torch.zeros(n, t, dtype=torch.bool)
    for r, traj in enumerate(rows):
        offset = t - len(traj) if r % left_pad_every == 0 else 0
        for h, (i, a) in enumerate(traj):
            c = offset + h
            out["state_idx"][r, c], out["action"][r, c] = i, a
            out["reward"][r, c] = tree.reward[i, a]
            out["ref_lp"][r, c] = tree.log_ref[i, a]
            out["behaviour_lp"][r, c] = tree.log_behaviour[i, a]
            out["mask"][r, c] = True
    return out
