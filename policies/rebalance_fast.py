"""Fast rebalancing: VM2RL's two stages as a greedy policy with local search.

Stage 1 (which pods) scores *evacuations*: up to `max_group` movable pods of one node, whose
leaving raises that node's fits. Stage 2 (where) sends each of them to the admitting node whose
score drops least (best fit), which depends only on the pod's signature, so the best and second
best target of every signature are kept in one (signatures x nodes) table, updated for the two
nodes a move touches. Each step applies the evacuation with the largest gain per move that fits
the remaining budget and PDBs; ruin-and-recreate rounds (undo one or two evacuations, refill
greedily) then repair greedy's myopic choices. A step is vectorised over all candidates, so a
10,000-node round takes about a second.

Only strictly improving evacuations are applied, so the plan never makes the objective worse.
Rounds of local search use a seeded generator: the same snapshot gives the same plan.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
from tessera.policies.fragmentation import FragmentationObjective
from tessera.policies.rebalance_model import RebalanceProblem, SolverResult

_EPS = 1e-12
_NONE = -1


@dataclass(frozen=True)
class FastOptions:
    """Knobs of the fast policy; the defaults are what bench/rebalance_bench.py measured."""

    max_group: int = 3
    """Most pods one evacuation moves off a node (stage 1's reach)."""
    shortlist: int = 24
    """Candidates re-evaluated exactly per step, out of those the vector estimate ranks first."""
    targets_kept: int = 8
    """Best targets kept per signature; must exceed max_group + 1 for exact stage 2."""
    local_search_rounds: int = 24
    seed: int = 0


class _Candidates:
    """Every evacuation: a node and a multiset of its movable pod groups (<= max_group pods)."""

    def __init__(self, problem: RebalanceProblem, max_group: int) -> None:
        self.group_pods: list[list[int]] = []
        self.group_sig: list[int] = []
        self.group_pdbs: list[tuple[int, ...]] = []
        self.pod_group: dict[int, int] = {}
        keys: dict[tuple[int, int, tuple[int, ...]], int] = {}
        by_node: defaultdict[int, list[int]] = defaultdict(list)
        for p in np.nonzero(problem.movable)[0]:
            key = (int(problem.pod_node[p]), int(problem.pod_signature[p]), problem.pod_pdbs[p])
            if key not in keys:
                keys[key] = len(self.group_pods)
                self.group_pods.append([])
                self.group_sig.append(key[1])
                self.group_pdbs.append(key[2])
                by_node[key[0]].append(keys[key])
            self.group_pods[keys[key]].append(int(p))
            self.pod_group[int(p)] = keys[key]
        nodes, members = [], []
        for n, groups in by_node.items():
            pool = [g for g in groups for _ in range(min(len(self.group_pods[g]), max_group))]
            for size in range(1, max_group + 1):
                for combo in set(itertools.combinations(pool, size)):
                    nodes.append(n)
                    members.append(combo)
        width = max_group
        self.by_node = {n: np.array(c, dtype=np.int64) for n, c in _indices_by(nodes).items()}
        self.node = np.array(nodes, dtype=np.int64)
        self.size = np.array([len(m) for m in members], dtype=np.int64)
        self.members = members
        self.group = np.full((len(members), width), _NONE, dtype=np.int64)
        self.count = np.zeros((len(members), width), dtype=np.int64)
        self.sig = np.full((len(members), width), _NONE, dtype=np.int64)
        for c, combo in enumerate(members):
            for j, (g, k) in enumerate(sorted(Counter(combo).items())):
                self.group[c, j], self.count[c, j] = g, k
            for j, g in enumerate(combo):
                self.sig[c, j] = self.group_sig[g]
        sig_req = problem.signature_requests
        self.requests = np.zeros((len(members), sig_req.shape[1]), dtype=np.int64)
        for j in range(width):
            present = self.sig[:, j] >= 0
            self.requests[present] += sig_req[self.sig[present, j]]


class _State:
    """Free capacity after the moves so far, per-node scores, each candidate's gain at its
    source, and each signature's best targets; kept current for the nodes a move touches."""

    def __init__(
        self,
        problem: RebalanceProblem,
        objective: FragmentationObjective,
        cands: _Candidates,
        keep: int,
    ) -> None:
        self.problem, self.objective, self.cands, self.keep = problem, objective, cands, keep
        all_nodes = np.arange(problem.free.shape[0])
        self.free = problem.free.copy()
        self.scores = objective.node_scores(self.free, all_nodes)
        self.gain_in = self._gain_in(all_nodes)
        self.src_gain = np.zeros(len(cands.node))
        self._update_sources(np.arange(len(cands.node)))
        self._refresh_top()

    def reset(self, moves: list[tuple[int, int]]) -> None:
        """The state after `moves` from the snapshot, recomputing only the nodes that differ."""
        problem = self.problem
        free = problem.free.copy()
        for p, t in moves:
            free[problem.pod_node[p]] += problem.pod_requests[p]
            free[t] -= problem.pod_requests[p]
        changed = np.nonzero((free != self.free).any(axis=1))[0]
        self.free = free
        if changed.size:
            self.touch(changed.tolist())

    def _gain_in(self, nodes: np.ndarray) -> np.ndarray:
        """(signatures, nodes) score change on receiving one pod of each signature (-inf:
        it cannot go there)."""
        req = self.problem.signature_requests
        after = self.free[nodes][None, :, :] - req[:, None, :]
        ok = self.problem.admits[:, nodes] & (after >= 0).all(axis=2)
        flat = after.reshape(-1, after.shape[2])
        scores = self.objective.node_scores(flat, np.tile(nodes, len(req)))
        gain = scores.reshape(len(req), len(nodes)) - self.scores[nodes][None, :]
        return np.where(ok, gain, -np.inf)

    def _update_sources(self, cand_idx: np.ndarray) -> None:
        nodes = self.cands.node[cand_idx]
        after = self.free[nodes] + self.cands.requests[cand_idx]
        self.src_gain[cand_idx] = self.objective.node_scores(after, nodes) - self.scores[nodes]

    def _refresh_top(self) -> None:
        keep = min(self.keep, self.gain_in.shape[1])
        top = np.argpartition(-self.gain_in, keep - 1, axis=1)[:, :keep]
        order = np.argsort(-np.take_along_axis(self.gain_in, top, axis=1), axis=1, kind="stable")
        self.top = np.take_along_axis(top, order, axis=1)
        self.top_gain = np.take_along_axis(self.gain_in, self.top, axis=1)

    def touch(self, nodes: list[int]) -> None:
        idx = np.array(sorted(set(nodes)), dtype=np.int64)
        self.scores[idx] = self.objective.node_scores(self.free[idx], idx)
        self.gain_in[:, idx] = self._gain_in(idx)
        by_node = self.cands.by_node
        cand_idx = [by_node[n] for n in idx.tolist() if n in by_node]
        if cand_idx:
            self._update_sources(np.concatenate(cand_idx))
        self._refresh_top()


def solve_fast(
    problem: RebalanceProblem,
    objective: FragmentationObjective,
    options: FastOptions | None = None,
) -> SolverResult:
    """A near-optimal plan in a fraction of the MIP's time."""
    options = options or FastOptions()
    if options.targets_kept <= options.max_group + 1:
        raise ValueError("targets_kept: must exceed max_group + 1")
    budget = problem.rules.move_budget
    if budget == 0 or not problem.movable.any():
        return SolverResult("fast", (), "nothing-to-move")
    cands = _Candidates(problem, min(options.max_group, budget))
    state = _State(problem, objective, cands, options.targets_kept)
    applied = _greedy(problem, objective, cands, state, [], shortlist=options.shortlist)
    best_moves = [m for evac in applied for m in evac]
    best_score = float(state.scores.sum())
    rng = np.random.default_rng(options.seed)
    for _ in range(options.local_search_rounds if len(applied) else 0):
        drop = set(
            rng.choice(len(applied), size=min(len(applied), rng.integers(1, 3)), replace=False)
        )
        kept = _without_dependents(problem, [e for i, e in enumerate(applied) if i not in drop])
        state.reset([m for evac in kept for m in evac])
        trial = _greedy(
            problem, objective, cands, state, kept, [applied[i] for i in drop], options.shortlist
        )
        score = float(state.scores.sum())
        moves = [m for evac in trial for m in evac]
        if score > best_score + _EPS or (
            score > best_score - _EPS and len(moves) < len(best_moves)
        ):
            applied, best_moves, best_score = trial, moves, score
    return SolverResult("fast", tuple(problem.moves_from_indices(best_moves)), "heuristic")


def _indices_by(values: list[int]) -> dict[int, list[int]]:
    out: defaultdict[int, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        out[v].append(i)
    return out


def _without_dependents(
    problem: RebalanceProblem, kept: list[list[tuple[int, int]]]
) -> list[list[tuple[int, int]]]:
    """`kept` less every evacuation that only fitted in room a dropped one had freed."""
    while kept:
        free = problem.free.copy()
        for evac in kept:
            for p, t in evac:
                free[problem.pod_node[p]] += problem.pod_requests[p]
                free[t] -= problem.pod_requests[p]
        over = set(np.nonzero((free < 0).any(axis=1))[0].tolist())
        if not over:
            break
        kept = [evac for evac in kept if not any(t in over for _, t in evac)]
    return kept


def _greedy(
    problem: RebalanceProblem,
    objective: FragmentationObjective,
    cands: _Candidates,
    state: _State,
    applied: list[list[tuple[int, int]]],
    banned: list[list[tuple[int, int]]] | None = None,
    shortlist: int = 24,
) -> list[list[tuple[int, int]]]:
    """Add evacuations to `applied` (whose moves `state` holds) while one improves the score.

    `banned` evacuations (just undone by local search) may not be re-applied first, so a round
    explores; after one other step they are allowed again.
    """
    applied = list(applied)
    moved = {p for evac in applied for p, _ in evac}
    remaining = np.array([len(g) for g in cands.group_pods], dtype=np.int64)
    for p in moved:
        remaining[cands.pod_group[p]] -= 1
    pdb_left = problem.pdb_allowed.copy()
    for p in moved:
        for pdb in problem.pod_pdbs[p]:
            pdb_left[pdb] -= 1
    banned_sets = [frozenset(p for p, _ in evac) for evac in banned or []]
    left = problem.rules.move_budget - len(moved)
    while left > 0 and len(cands.node):
        best = _best_evacuation(
            problem, cands, state, remaining, pdb_left, moved, left, banned_sets, shortlist
        )
        if best is None:
            break
        evacuation = best
        for p, t in evacuation:
            moved.add(p)
            state.free[problem.pod_node[p]] += problem.pod_requests[p]
            state.free[t] -= problem.pod_requests[p]
            for pdb in problem.pod_pdbs[p]:
                pdb_left[pdb] -= 1
        for p, _ in evacuation:
            remaining[cands.pod_group[p]] -= 1
        state.touch([int(problem.pod_node[evacuation[0][0]])] + [t for _, t in evacuation])
        applied.append(evacuation)
        left -= len(evacuation)
        banned_sets = []
    return applied


def _best_evacuation(
    problem: RebalanceProblem,
    cands: _Candidates,
    state: _State,
    remaining: np.ndarray,
    pdb_left: np.ndarray,
    moved: set[int],
    left: int,
    banned: list[frozenset[int]],
    shortlist: int,
) -> list[tuple[int, int]] | None:
    """Stage 1 by vector estimate, then stages 1 and 2 exactly on a shortlist."""
    present = cands.group >= 0
    enough = np.where(present, remaining[np.maximum(cands.group, 0)] >= cands.count, True)
    valid = enough.all(axis=1) & (cands.size <= left)
    src_gain = state.src_gain
    valid &= src_gain > _EPS
    if not valid.any():
        return None
    idx = np.nonzero(valid)[0]
    est = src_gain[idx].copy()
    for j in range(cands.sig.shape[1]):
        sig = cands.sig[idx, j]
        has = sig >= 0
        s = np.maximum(sig, 0)
        first = np.where(
            state.top[s, 0] != cands.node[idx], state.top_gain[s, 0], state.top_gain[s, 1]
        )
        est += np.where(has, first, 0.0)
    ratio = est / cands.size[idx]
    order = idx[np.argsort(-ratio, kind="stable")][:shortlist]
    best, best_ratio = None, _EPS
    for c in order:
        if ratio[np.searchsorted(idx, c)] <= best_ratio and best is not None:
            break
        plan = _exact(problem, cands, state, int(c), remaining, pdb_left, moved)
        if plan is None:
            continue
        moves, gain = plan
        if banned and frozenset(p for p, _ in moves) in banned:
            continue
        if gain / len(moves) > best_ratio:
            best, best_ratio = moves, gain / len(moves)
    return best


def _exact(
    problem: RebalanceProblem,
    cands: _Candidates,
    state: _State,
    c: int,
    remaining: np.ndarray,
    pdb_left: np.ndarray,
    moved: set[int],
) -> tuple[list[tuple[int, int]], float] | None:
    """The evacuation's moves (largest pod first, each to its best target) and exact gain."""
    objective = state.objective
    node = int(cands.node[c])
    pods: list[int] = []
    for g, k in Counter(cands.members[c]).items():
        free_pods = [p for p in cands.group_pods[g] if p not in moved]
        if len(free_pods) < k:
            return None
        pods += free_pods[:k]
    pdb_need = Counter(pdb for p in pods for pdb in problem.pod_pdbs[p])
    if any(pdb_left[pdb] < k for pdb, k in pdb_need.items()):
        return None
    src = state.free[node] + problem.pod_requests[pods].sum(axis=0)
    gain = float(objective.node_scores(src[None, :], np.array([node]))[0] - state.scores[node])
    changed: dict[int, np.ndarray] = {}
    moves = []
    for p in sorted(pods, key=lambda p: -int(problem.pod_requests[p, 0])):
        k = int(problem.pod_signature[p])
        req = problem.pod_requests[p]
        best_t, best_g = _NONE, -np.inf
        for t, g in zip(state.top[k], state.top_gain[k], strict=True):
            t = int(t)
            if t == node or not np.isfinite(g):
                continue
            if t in changed:
                after = changed[t] - req
                if (after < 0).any():
                    continue
                idx = np.array([t])
                g = float(
                    objective.node_scores(after[None, :], idx)[0]
                    - objective.node_scores(changed[t][None, :], idx)[0]
                )
            if g > best_g:
                best_t, best_g = t, g
        if best_t == _NONE:
            return None
        changed[best_t] = changed.get(best_t, state.free[best_t]) - req
        gain += best_g
        moves.append((p, best_t))
    return moves, gain
