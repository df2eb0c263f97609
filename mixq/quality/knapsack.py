"""The multiple-choice knapsack behind `mixq plan --measure`: pick one option per group
(a group is a set of units planned together; an option is one format assignment with its
bytes and estimated loss) so that the summed loss is smallest with summed bytes <= budget.

Two solvers:
- `solve_exact`: dynamic programming over the Pareto front of (bytes, loss) partial sums.
  Dominated partial sums (more bytes and no less loss) are dropped, and so are sums that
  cannot fit even with every later group at its cheapest, so the front stays small for
  the dense models this is for (a 30-layer model: thousands of states). Optimal.
- `solve_greedy`: the classic relaxation (Sinha & Zoltners): each group's options reduced
  to their lower convex hull, every hull step ranked by loss saved per byte, steps taken
  best first while they fit, then any single-group upgrade that still fits. Linear-time up
  to a sort; off the optimum by at most the loss drop of one hull step.
`solve` runs the exact one and falls back to the greedy one when the front grows past
`max_states` (large MoE models: thousands of experts)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Option:
    """One choice for a group: its bytes, estimated loss, and what it means (opaque)."""

    bytes: int
    loss: float
    label: object = None


@dataclass
class Solution:
    choice: list[int]  # option index per group
    bytes: int
    loss: float
    method: str  # "exact" | "greedy"
    # the next-best choices that fit (exact solver: the final Pareto front's states by
    # loss, i.e. the best mix at each smaller byte count), for the planner's verification
    alternatives: list[list[int]] = field(default_factory=list)


class BudgetTooSmall(ValueError):
    """The budget is below the cheapest option of every group summed."""

    def __init__(self, budget: int, min_bytes: int):
        super().__init__(f"the budget ({budget} bytes) is below the smallest possible mix ({min_bytes} bytes)")
        self.budget, self.min_bytes = budget, min_bytes


def _check(groups: list[list[Option]], budget: int) -> int:
    if any(not g for g in groups):
        raise ValueError("knapsack: a group has no option")
    lo = sum(min(o.bytes for o in g) for g in groups)
    if lo > budget:
        raise BudgetTooSmall(budget, lo)
    return lo


def _total(groups, choice) -> tuple[int, float]:
    b = sum(groups[i][c].bytes for i, c in enumerate(choice))
    return b, float(sum(groups[i][c].loss for i, c in enumerate(choice)))


def solve_exact(groups: list[list[Option]], budget: int, max_states: int | None = None,
                alternatives: int = 0) -> Solution | None:
    """Optimal choice, or None when the Pareto front grows past max_states; with
    `alternatives`, that many runners-up of the final front too."""
    _check(groups, budget)
    mins = np.array([min(o.bytes for o in g) for g in groups], dtype=np.int64)
    rest = np.concatenate([np.cumsum(mins[::-1])[::-1][1:], [0]])  # cheapest bytes of the groups after g
    sb, sl = np.zeros(1, np.int64), np.zeros(1, np.float64)
    back = []
    for g, opts in enumerate(groups):
        ob = np.array([o.bytes for o in opts], np.int64)
        ol = np.array([o.loss for o in opts], np.float64)
        cb = (sb[:, None] + ob[None, :]).ravel()
        cl = (sl[:, None] + ol[None, :]).ravel()
        ok = cb + rest[g] <= budget
        idx = np.flatnonzero(ok)
        order = idx[np.lexsort((cl[idx], cb[idx]))]  # by bytes, then loss
        loss = cl[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], loss[:-1]]))
        keep = order[loss < best_before]  # strictly better than everything cheaper
        if max_states is not None and keep.size > max_states:
            return None
        n = len(opts)
        sb, sl = cb[keep], cl[keep]
        back.append((keep // n, keep % n))  # (parent state, option) of each kept state
    def trace(state: int) -> list[int]:
        choice = [0] * len(groups)
        for g in range(len(groups) - 1, -1, -1):
            parent, opt = back[g]
            choice[g] = int(opt[state])
            state = int(parent[state])
        return choice

    ranked = np.argsort(sl, kind="stable")[: 1 + alternatives]
    choice = trace(int(ranked[0]))
    b, loss = _total(groups, choice)
    return Solution(choice, b, loss, "exact", [trace(int(i)) for i in ranked[1:]])


def lower_hull(opts: list[Option]) -> list[int]:
    """Indices of the options on the lower convex hull of (bytes, loss), cheapest first,
    loss strictly falling (dominated and non-convex options left out)."""
    order = sorted(range(len(opts)), key=lambda i: (opts[i].bytes, opts[i].loss))
    front = []
    for i in order:  # Pareto front: each next option must lose strictly less
        if not front or opts[i].loss < opts[front[-1]].loss:
            if front and opts[i].bytes == opts[front[-1]].bytes:
                front[-1] = i
            else:
                front.append(i)
    hull: list[int] = []
    for i in front:
        while len(hull) >= 2:
            a, b = opts[hull[-2]], opts[hull[-1]]
            c = opts[i]
            # b lies on or above the segment a-c: drop it (cross product of (b-a, c-a) <= 0)
            if (b.bytes - a.bytes) * (c.loss - a.loss) - (b.loss - a.loss) * (c.bytes - a.bytes) <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def solve_greedy(groups: list[list[Option]], budget: int) -> Solution:
    """Hull steps by loss saved per byte, best first, while they fit; then upgrades."""
    _check(groups, budget)
    hulls = [lower_hull(g) for g in groups]
    choice = [h[0] for h in hulls]
    total = sum(groups[g][c].bytes for g, c in enumerate(choice))
    steps = []
    for g, h in enumerate(hulls):
        for k in range(1, len(h)):
            a, b = groups[g][h[k - 1]], groups[g][h[k]]
            steps.append(((a.loss - b.loss) / (b.bytes - a.bytes), g, k))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    blocked = set()
    pos = [0] * len(groups)
    for _, g, k in steps:
        if g in blocked or k != pos[g] + 1:
            continue
        extra = groups[g][hulls[g][k]].bytes - groups[g][choice[g]].bytes
        if total + extra > budget:
            blocked.add(g)  # later steps of this group come after this one
            continue
        total += extra
        choice[g], pos[g] = hulls[g][k], k
    improved = True
    while improved:  # spend what is left on the single upgrade that saves the most loss
        improved, best = False, None
        for g, opts in enumerate(groups):
            cur = opts[choice[g]]
            for i, o in enumerate(opts):
                if o.loss < cur.loss and total - cur.bytes + o.bytes <= budget:
                    gain = cur.loss - o.loss
                    if best is None or gain > best[0]:
                        best = (gain, g, i)
        if best is not None:
            _, g, i = best
            total += groups[g][i].bytes - groups[g][choice[g]].bytes
            choice[g], improved = i, True
    b, loss = _total(groups, choice)
    return Solution(choice, b, loss, "greedy")


def solve(groups: list[list[Option]], budget: int, max_states: int = 200_000, alternatives: int = 0) -> Solution:
    """Exact where the Pareto front stays under max_states, else greedy (no alternatives)."""
    sol = solve_exact(groups, budget, max_states, alternatives)
    return sol if sol is not None else solve_greedy(groups, budget)
