"""The multiple-choice knapsack: exact against brute-force enumeration on small random
cases, never over budget, monotone in budget; the greedy one within one hull step of the
optimum; a budget below the smallest mix refused."""

from __future__ import annotations

import itertools
import random

import pytest

from mixq.quality.knapsack import (
    BudgetTooSmall,
    Option,
    lower_hull,
    solve,
    solve_exact,
    solve_greedy,
)


def random_groups(rng: random.Random, n_groups: int, n_opts: int) -> list[list[Option]]:
    groups = []
    for _ in range(n_groups):
        opts = []
        for _ in range(rng.randint(1, n_opts)):
            opts.append(Option(rng.randint(1, 60), round(rng.uniform(0, 10), 3)))
        groups.append(opts)
    return groups


def brute_force(groups, budget):
    best = None
    for choice in itertools.product(*(range(len(g)) for g in groups)):
        b = sum(groups[i][c].bytes for i, c in enumerate(choice))
        if b > budget:
            continue
        loss = sum(groups[i][c].loss for i, c in enumerate(choice))
        if best is None or loss < best:
            best = loss
    return best


@pytest.mark.parametrize("seed", range(40))
def test_exact_matches_brute_force_and_fits(seed):
    rng = random.Random(seed)
    groups = random_groups(rng, rng.randint(1, 5), 4)
    lo = sum(min(o.bytes for o in g) for g in groups)
    hi = sum(max(o.bytes for o in g) for g in groups)
    for budget in sorted({lo, hi, rng.randint(lo, hi), rng.randint(lo, hi)}):
        sol = solve_exact(groups, budget)
        assert sol.bytes <= budget
        assert sol.bytes == sum(groups[i][c].bytes for i, c in enumerate(sol.choice))
        assert sol.loss == pytest.approx(brute_force(groups, budget), abs=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_greedy_fits_and_is_within_one_hull_step(seed):
    rng = random.Random(100 + seed)
    groups = random_groups(rng, rng.randint(2, 7), 5)
    lo = sum(min(o.bytes for o in g) for g in groups)
    hi = sum(max(o.bytes for o in g) for g in groups)
    # the largest loss drop of one hull step: the greedy's distance to the LP bound
    step = max((groups[g][h[k - 1]].loss - groups[g][h[k]].loss for g in range(len(groups))
                for h in [lower_hull(groups[g])] for k in range(1, len(h))), default=0.0)
    for budget in range(lo, hi + 1, max(1, (hi - lo) // 7)):
        g = solve_greedy(groups, budget)
        e = solve_exact(groups, budget)
        assert g.bytes <= budget
        assert e.loss - 1e-9 <= g.loss <= e.loss + step + 1e-9


def test_monotone_in_budget():
    rng = random.Random(7)
    groups = random_groups(rng, 12, 5)
    lo = sum(min(o.bytes for o in g) for g in groups)
    hi = sum(max(o.bytes for o in g) for g in groups)
    losses = [solve(groups, b).loss for b in range(lo, hi + 1, 3)]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert losses[-1] == pytest.approx(sum(min(o.loss for o in g) for g in groups))


def test_lower_hull_by_hand():
    # (bytes, loss): B is dominated by A (more bytes, more loss); C lies above the A-D line
    opts = [Option(10, 5.0), Option(20, 6.0), Option(30, 4.0), Option(40, 1.0), Option(50, 0.0), Option(60, 0.0)]
    assert lower_hull(opts) == [0, 3, 4]


def test_falls_back_to_greedy_when_the_front_is_large():
    rng = random.Random(3)
    groups = random_groups(rng, 10, 5)
    lo = sum(min(o.bytes for o in g) for g in groups)
    budget = (lo + sum(max(o.bytes for o in g) for g in groups)) // 2
    assert solve(groups, budget, max_states=2).method == "greedy"
    assert solve(groups, budget).method == "exact"


def test_budget_below_the_smallest_mix():
    groups = [[Option(5, 1.0), Option(9, 0.0)], [Option(3, 0.5)]]
    with pytest.raises(BudgetTooSmall, match=r"budget \(7 bytes\) is below the smallest possible mix \(8 bytes\)"):
        solve(groups, 7)


@pytest.mark.parametrize("seed", range(20))
def test_runners_up_are_the_best_mixes_at_fewer_bytes(seed):
    """The exact solver's runners-up (for the planner's verification): distinct choices that
    fit, by rising loss after the optimum, each the brute-force best of every mix of no more
    bytes than it has (a point of the Pareto front)."""
    rng = random.Random(1000 + seed)
    groups = random_groups(rng, rng.randint(2, 4), 4)
    lo, hi = sum(min(o.bytes for o in g) for g in groups), sum(max(o.bytes for o in g) for g in groups)
    budget = rng.randint(lo, hi)
    sol = solve_exact(groups, budget, alternatives=3)
    combos = [(sum(g[c].bytes for g, c in zip(groups, ch)), sum(g[c].loss for g, c in zip(groups, ch)))
              for ch in itertools.product(*(range(len(g)) for g in groups))]
    seen = [sol.choice]
    prev = sol.loss
    for ch in sol.alternatives:
        b = sum(g[c].bytes for g, c in zip(groups, ch))
        loss = sum(g[c].loss for g, c in zip(groups, ch))
        assert b <= budget and ch not in seen and loss >= prev - 1e-12
        assert loss == pytest.approx(min(x for bb, x in combos if bb <= b), abs=1e-9)
        seen.append(ch)
        prev = loss
    # as many as the front has, up to 3: every strictly better-per-byte level below the optimum
    front = {}
    for b, loss in sorted(combos):
        if b <= budget and (not front or loss < min(front.values()) - 1e-12):
            front[b] = loss
    assert len(sol.alternatives) == min(3, len(front) - 1)
