"""Fast rebalancing: VM2RL's two stages as a greedy policy with local search.

Stage 1 (which pods) scores *evacuations*: up to `max_group` movable pods of one node, whose
leaving raises that node's fits. Stage 2 (where) sends each of them to the admitting node whose
score drops least (best fit), which depends only on the pod's signature, so the best targets of
every signature are kept in one (signatures x nodes) table, updated for the nodes a move
touches; or, where no direct target is good enough, to a node it *prepares* by moving up to
`max_prepare` pods off it first (an ejection chain; a second table, per signature, kept the
same way). Each step applies the evacuation with the largest gain per move that fits the
remaining budget and PDBs; ruin-and-recreate rounds (undo one or two evacuations, refill
greedily) then repair greedy's myopic choices. A step is vectorised over all candidates:
bench/rebalance_bench.py measures about 0.3 s of CPU at 1,000 nodes and 4 s at 10,000.

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
    max_prepare: int = 3
    """Most pods moved off a node to prepare it as a target (stage 2's ejection chains)."""
    shortlist: int = 24
    """Candidates re-evaluated exactly per step, out of those the vector estimate ranks first."""
    targets_kept: int = 8
    """Best targets kept per signature; must exceed max_group + 1 for exact stage 2."""
    local_search_rounds: int = 8
    seed: int = 0


class _Candidates:
    """Every evacuation: a node and a multiset of its movable pod groups (<= max_group pods)."""

    def __init__(self, problem: RebalanceProblem, max_group: int, max_prepare: int) -> None:
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
        self.by_node = _indices_by(nodes)
        self.node = np.array(nodes, dtype=np.int64)
        self.members = members
        self.member = np.array([m + (_NONE,) * (width - len(m)) for m in members], dtype=np.int64)
        self.member = self.member.reshape(len(members), width)
        self.size = (self.member >= 0).sum(axis=1)
        # Combos are sorted, so a repeated group sits in a run; its n-th copy needs n+1 pods left.
        self.occurrence = np.zeros_like(self.member)
        for j in range(1, width):
            same = self.member[:, j] == self.member[:, j - 1]
            self.occurrence[:, j] = np.where(same, self.occurrence[:, j - 1] + 1, 0)
        self.moving_signatures = np.array(sorted(set(self.group_sig)), dtype=np.int64)
        group_sig = np.array([*self.group_sig, _NONE], dtype=np.int64)
        self.sig = group_sig[self.member]  # _NONE indexes the sentinel
        self.within_pdbs = self._within_pdbs(problem)
        sig_req = problem.signature_requests
        self.requests = np.zeros((len(members), sig_req.shape[1]), dtype=np.int64)
        for j in range(width):
            present = self.sig[:, j] >= 0
            self.requests[present] += sig_req[self.sig[present, j]]
        # (signature, evacuation of <= max_prepare pods on a node admitting it): every way to
        # prepare a target for a pod of that signature (stage 2's ejection chains).
        # Only for multi-GPU pods: a single GPU nearly always has a direct target.
        small = np.nonzero(self.size <= max_prepare)[0]
        chained = [k for k in self.moving_signatures if problem.signature_requests[k, 0] >= 2]
        hosts = [small[problem.admits[k, self.node[small]]] for k in chained]
        self.host_sig = np.repeat(np.array(chained, dtype=np.int64), [h.size for h in hosts])
        self.host_cand = np.concatenate(hosts) if hosts else np.zeros(0, dtype=np.int64)
        self.host_segments = [
            (int(k), int(a), int(b))
            for k, a, b in zip(
                chained,
                np.cumsum([0] + [h.size for h in hosts])[:-1],
                np.cumsum([h.size for h in hosts]),
                strict=True,
            )
            if b > a
        ]
        self.hosts_by_node = _indices_by(self.node[self.host_cand])

    def _within_pdbs(self, problem: RebalanceProblem) -> np.ndarray:
        """Whether each candidate disrupts no PDB more than it allows (before any move)."""
        width = self.member.shape[1]
        single = np.array([len(p) <= 1 for p in self.group_pdbs] + [True])
        pdb = np.array([p[0] if p else _NONE for p in self.group_pdbs] + [_NONE])
        member_pdb = pdb[self.member]
        ok = np.ones(len(self.member), dtype=bool)
        allowed = np.append(problem.pdb_allowed, 0)
        for j in range(width):
            count = (member_pdb == member_pdb[:, j : j + 1]).sum(axis=1)
            ok &= (member_pdb[:, j] < 0) | (count <= allowed[member_pdb[:, j]])
        for c in np.nonzero(~single[self.member].all(axis=1))[0]:  # pods under several PDBs
            need = Counter(d for g in self.members[c] for d in self.group_pdbs[g])
            ok[c] = all(problem.pdb_allowed[d] >= n for d, n in need.items())
        return ok


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
        self.host_gain = np.full(len(cands.host_cand), -np.inf)
        self._update_hosts(np.arange(len(cands.host_cand)))
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
        it cannot go there, or no pod of that signature moves)."""
        sigs = self.cands.moving_signatures
        out = np.full((len(self.problem.signature_requests), len(nodes)), -np.inf)
        req = self.problem.signature_requests[sigs]
        after = self.free[nodes][None, :, :] - req[:, None, :]
        ok = self.problem.admits[sigs][:, nodes] & (after >= 0).all(axis=2)
        flat = after.reshape(-1, after.shape[2])
        scores = self.objective.node_scores(flat, np.tile(nodes, len(sigs)))
        gain = scores.reshape(len(sigs), len(nodes)) - self.scores[nodes][None, :]
        out[sigs] = np.where(ok, gain, -np.inf)
        return out

    def _update_sources(self, cand_idx: np.ndarray) -> None:
        nodes = self.cands.node[cand_idx]
        after = self.free[nodes] + self.cands.requests[cand_idx]
        self.src_gain[cand_idx] = self.objective.node_scores(after, nodes) - self.scores[nodes]

    def _update_hosts(self, pairs: np.ndarray) -> None:
        """Score change of each (signature, evacuation) pair's node when the evacuation leaves
        and one pod of the signature arrives; -inf where it would not fit, or fits already."""
        cands = self.cands
        c = cands.host_cand[pairs]
        nodes = cands.node[c]
        req = self.problem.signature_requests[cands.host_sig[pairs]]
        room = self.free[nodes] + cands.requests[c] - req
        hit = (room >= 0).all(axis=1) & ~(self.free[nodes] >= req).all(axis=1)
        gain = np.full(pairs.size, -np.inf)
        if hit.any():
            gain[hit] = self.objective.node_scores(room[hit], nodes[hit]) - self.scores[nodes[hit]]
        self.host_gain[pairs] = gain

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
        hosts = self.cands.hosts_by_node
        pair_idx = [hosts[n] for n in idx.tolist() if n in hosts]
        if pair_idx:
            self._update_hosts(np.concatenate(pair_idx))
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
    cands = _Candidates(problem, min(options.max_group, budget), options.max_prepare)
    state = _State(problem, objective, cands, options.targets_kept)
    applied = _greedy(problem, objective, cands, state, [], shortlist=options.shortlist)
    best_moves = [m for evac in applied for m in evac]
    best_score = float(state.scores.sum())
    rng = np.random.default_rng(options.seed)
    for _ in range(options.local_search_rounds if len(applied) else 0):
        drop = set(
            rng.choice(len(applied), size=min(len(applied), int(rng.integers(1, 3))), replace=False)
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


def _indices_by(values: list[int] | np.ndarray) -> dict[int, np.ndarray]:
    """Positions of each distinct value."""
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        return {}
    order = np.argsort(values, kind="stable")
    keys, starts = np.unique(values[order], return_index=True)
    return dict(zip(keys.tolist(), np.split(order, starts[1:]), strict=True))


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
        state.touch([int(problem.pod_node[p]) for p, _ in evacuation] + [t for _, t in evacuation])
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
    """Stage 1 by vector estimate, then stages 1 and 2 exactly on a shortlist.

    Stage 2 may also *prepare* a target: move up to `max_prepare` pods off a node so the pod
    fits there (an ejection chain, e.g. two 2-GPU pods off an A100 node so an 8-GPU pod can
    leave an H100 node whole); without it greedy stalls where every single move loses.
    """
    present = cands.member >= 0
    enough = ~present | (remaining[np.maximum(cands.member, 0)] > cands.occurrence)
    available = enough.all(axis=1) & cands.within_pdbs
    valid = available & (cands.size <= left) & (state.src_gain > _EPS)
    if not valid.any():
        return None
    chains = _chain_table(problem, cands, state, available & (cands.size <= left - 1))
    idx = np.nonzero(valid)[0]
    est = state.src_gain[idx].copy()
    size = cands.size[idx].astype(float)
    node = cands.node[idx]
    for j in range(cands.sig.shape[1]):
        sig = cands.sig[idx, j]
        has = sig >= 0
        s = np.maximum(sig, 0)
        direct = np.where(state.top[s, 0] != node, state.top_gain[s, 0], state.top_gain[s, 1])
        via = np.where(chains.node[s, 0] != node, chains.value[s, 0], chains.value[s, 1])
        via_size = np.where(chains.node[s, 0] != node, chains.size[s, 0], chains.size[s, 1])
        use_chain = via > direct
        est += np.where(has, np.maximum(direct, via), 0.0)
        size += np.where(has & use_chain, via_size, 0)
    ratio = np.where(size <= left, est / size, -np.inf)
    if ratio.size > shortlist:
        head = np.argpartition(-ratio, shortlist - 1)[:shortlist]
    else:
        head = np.arange(ratio.size)
    head = head[np.argsort(-ratio[head], kind="stable")]
    best, best_ratio = None, _EPS
    for h in head:
        if not np.isfinite(ratio[h]):
            break
        for use_chains in (False, True):
            plan = _exact(
                problem, cands, state, chains, int(idx[h]), pdb_left, moved, left, use_chains
            )
            if plan is None:
                continue
            moves, gain = plan
            if banned and frozenset(p for p, _ in moves) in banned:
                continue
            if gain / len(moves) > best_ratio:
                best, best_ratio = moves, gain / len(moves)
    return best


@dataclass
class _Chains:
    """Per signature, the best nodes to prepare for one of its pods: node, evacuation
    candidate, its size in moves, and the estimated gain (target change + its pods' moves)."""

    node: np.ndarray
    cand: np.ndarray
    size: np.ndarray
    value: np.ndarray


def _chain_table(
    problem: RebalanceProblem, cands: _Candidates, state: _State, usable: np.ndarray
) -> _Chains:
    keep = 6
    n_sig = len(problem.signature_requests)
    table = _Chains(
        np.full((n_sig, keep), _NONE, dtype=np.int64),
        np.full((n_sig, keep), _NONE, dtype=np.int64),
        np.zeros((n_sig, keep), dtype=np.int64),
        np.full((n_sig, keep), -np.inf),
    )
    moves_out = np.zeros(len(cands.node))
    for j in range(cands.sig.shape[1]):
        sig = cands.sig[:, j]
        s = np.maximum(sig, 0)
        first = state.top[s, 0] != cands.node
        direct = np.where(first, state.top_gain[s, 0], state.top_gain[s, 1])
        moves_out += np.where(sig >= 0, direct, 0.0)
    value = state.host_gain + moves_out[cands.host_cand]
    value[~usable[cands.host_cand]] = -np.inf
    for k, a, b in cands.host_segments:
        segment = value[a:b]
        n = min(keep, segment.size)
        top = np.argpartition(-segment, n - 1)[:n]
        top = top[np.argsort(-segment[top], kind="stable")]
        top = top[np.isfinite(segment[top])]
        if top.size == 0:
            continue
        c = cands.host_cand[a + top]
        table.node[k, : top.size] = cands.node[c]
        table.cand[k, : top.size] = c
        table.size[k, : top.size] = cands.size[c]
        table.value[k, : top.size] = segment[top]
    return table


def _pods_of(cands: _Candidates, c: int, taken: set[int]) -> list[int] | None:
    """Pods for candidate c's groups, none of them already moved or used in this plan."""
    pods: list[int] = []
    for g, k in Counter(cands.members[c]).items():
        free_pods = [p for p in cands.group_pods[g] if p not in taken]
        if len(free_pods) < k:
            return None
        pods += free_pods[:k]
    return pods


def _best_direct(
    state: _State, k: int, req: np.ndarray, avoid: set[int], free: dict[int, np.ndarray]
) -> int:
    """Best target of one pod of signature k among the kept ones, given this plan's changes."""
    objective = state.objective
    best_t, best_g = _NONE, -np.inf
    for t, g in zip(state.top[k], state.top_gain[k], strict=True):
        t = int(t)
        if t in avoid or not np.isfinite(g):
            continue
        if t in free:
            after = free[t] - req
            if (after < 0).any():
                continue
            idx = np.array([t])
            g = float(
                objective.node_scores(after[None, :], idx)[0]
                - objective.node_scores(free[t][None, :], idx)[0]
            )
        if g > best_g:
            best_t, best_g = t, g
    return best_t


def _exact(
    problem: RebalanceProblem,
    cands: _Candidates,
    state: _State,
    chains: _Chains,
    c: int,
    pdb_left: np.ndarray,
    moved: set[int],
    left: int,
    use_chains: bool,
) -> tuple[list[tuple[int, int]], float] | None:
    """Candidate c as moves (largest pod first, each to its best direct target or, with
    `use_chains`, a prepared one where the estimate says that is better) and its exact gain,
    or None where it breaks capacity, a PDB or the budget."""
    source = int(cands.node[c])
    taken = set(moved)
    pods = _pods_of(cands, c, taken)
    if pods is None:
        return None
    taken |= set(pods)
    pdb_use = Counter(pdb for q in pods for pdb in problem.pod_pdbs[q])
    if any(pdb_left[pdb] < n for pdb, n in pdb_use.items()):
        return None
    free: dict[int, np.ndarray] = {source: state.free[source] + problem.pod_requests[pods].sum(0)}
    locked = {source}
    moves: list[tuple[int, int]] = []

    def place(p: int, avoid: set[int]) -> bool:
        req = problem.pod_requests[p]
        t = _best_direct(state, int(problem.pod_signature[p]), req, avoid, free)
        if t == _NONE:
            return False
        free[t] = free.get(t, state.free[t]) - req
        moves.append((p, t))
        return True

    for p in sorted(pods, key=lambda p: -int(problem.pod_requests[p, 0])):
        k = int(problem.pod_signature[p])
        req = problem.pod_requests[p]
        direct = _best_direct(state, k, req, locked, free)
        direct_gain = state.top_gain[k][state.top[k] == direct][0] if direct != _NONE else -np.inf
        prepared = False
        options = zip(chains.node[k], chains.cand[k], chains.value[k], strict=True)
        for b, cb, value in options if use_chains else ():
            b = int(b)
            if b == _NONE or value <= direct_gain or b in free or b in locked:
                continue
            sub = _pods_of(cands, int(cb), taken)
            if sub is None or len(moves) + len(pods) + len(sub) > left:
                continue
            sub_use = pdb_use + Counter(pdb for q in sub for pdb in problem.pod_pdbs[q])
            if any(pdb_left[pdb] < n for pdb, n in sub_use.items()):
                continue
            mark, saved = len(moves), dict(free)
            free[b] = state.free[b] + problem.pod_requests[sub].sum(0) - req
            if all(place(q, locked | {b}) for q in sub):
                moves.append((p, b))
                taken |= set(sub)
                pdb_use = sub_use
                locked.add(b)
                prepared = True
                break
            del moves[mark:]
            free.clear()
            free.update(saved)
        if not prepared and not place(p, locked):
            return None
    if len(moves) > left:
        return None
    touched = np.array(sorted(free), dtype=np.int64)
    after = np.array([free[n] for n in touched])
    if (after < 0).any():
        return None
    gain = float(state.objective.node_scores(after, touched).sum() - state.scores[touched].sum())
    return moves, gain
