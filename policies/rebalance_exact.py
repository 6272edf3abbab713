"""Exact rebalancing: the move-budgeted defragmentation problem as a MIP, solved by HiGHS.

The baseline the fast policy is measured against, not what the controller runs (HiGHS is a dev
dependency). The model is a flow of pod *signatures* (same requests, same node requirement):
which node a moved pod lands on depends only on its signature, so instead of one binary per
(pod, node) it has

- out_g, integer: pods leaving node n from group g (pods of one signature and one PDB set on n);
- in_{n,k}, integer: pods of signature k arriving at node n (only where n admits k);
- f_{n,r}, continuous >= 0: node n's free resource r after the moves (= capacity respected);
- y_{s,n}, integer: replicas of shape s that fit node n afterwards (d_{s,r} y_{s,n} <= f_{n,r});

with sum_g out_g = sum_n in_{n,k} per signature, sum out <= moveBudget, per PDB sum out <=
disruptionsAllowed, and the objective max sum coef_s y_{s,n} - eps * moves (the smallest plan
among equal scores). Any pairing of leaving pods with arriving slots of their signature is a
legal plan, so the MIP's optimum is the problem's optimum. A time limit keeps it bounded; the
result then carries HiGHS's dual bound.

Those rows alone make a weak relaxation: the LP counts fractional replicas on every node a pod
may leave. So each node also gets its *leaving patterns* (binary z_{n,p}: exactly these counts
leave its groups; at most one per node; out is their sum) and the row y_{s,n} <= fits now +
sum_p (fits of s once p has left - fits now) z_{n,p}, exact on the source side (arrivals only
take fits away). Nodes with more than `max_patterns` patterns keep the aggregate rows only.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tessera.policies.fragmentation import FragmentationObjective
from tessera.policies.rebalance_model import Move, RebalanceProblem, SolverResult

_INF = float("inf")


class _Columns:
    """Column bounds, costs and integrality, appended block by block."""

    def __init__(self) -> None:
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.cost: list[float] = []
        self.integer: list[int] = []

    def add(self, lower: float, upper: float, cost: float, integer: bool) -> int:
        self.lower.append(lower)
        self.upper.append(upper)
        self.cost.append(cost)
        self.integer.append(1 if integer else 0)
        return len(self.lower) - 1


class _Rows:
    """Sparse rows lower <= sum(value * column) <= upper, in the CSR form HiGHS takes."""

    def __init__(self) -> None:
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.starts: list[int] = []
        self.index: list[int] = []
        self.value: list[float] = []

    def add(self, terms: list[tuple[int, float]], lower: float, upper: float) -> None:
        self.starts.append(len(self.index))
        for column, value in terms:
            self.index.append(column)
            self.value.append(value)
        self.lower.append(lower)
        self.upper.append(upper)


def solve_exact(
    problem: RebalanceProblem,
    objective: FragmentationObjective,
    time_limit_s: float = 60.0,
    threads: int = 1,
    heuristic_effort: float = 0.05,
    max_patterns: int = 256,
    start: Sequence[Move] = (),
) -> SolverResult:
    """The best plan HiGHS finds within `time_limit_s`; status says whether it is proven.

    `heuristic_effort` is HiGHS's mip_heuristic_effort (its default 0.05): more finds good
    plans sooner on large instances, at the cost of proving them. `max_patterns`: a node with
    more ways for its pods to leave than this keeps only the aggregate rows (a weaker bound).
    `start`: a legal plan (the fast policy's) HiGHS begins from as its first incumbent, so its
    search prunes against it from the start; the result is never worse than it.
    """
    try:
        import highspy
    except ImportError as exc:  # a dev dependency; the controller uses the fast policy
        raise RuntimeError("solve_exact needs highspy: pip install highspy") from exc
    budget = problem.rules.move_budget
    movable = np.nonzero(problem.movable)[0]
    if budget == 0 or movable.size == 0:
        return SolverResult("mip", (), "nothing-to-move")

    cols, rows = _Columns(), _Rows()
    positive = objective.coef[objective.coef > 0]
    eps = float(positive.min()) / (10.0 * (budget + 1)) if positive.size else 0.0
    # HiGHS is given costs near 1 and resource rows in units that keep them below ~64 (GPUs,
    # cores, tens of GiB): with raw MiB (up to 2e6) and costs of 1e-7 its presolve and simplex
    # slow down severalfold on badly scaled rows. The bound is scaled back below.
    cost_scale = 1.0 / float(positive.max()) if positive.size else 1.0
    unit = _resource_units(problem)

    groups: defaultdict[tuple[int, int, tuple[int, ...]], list[int]] = defaultdict(list)
    for p in movable:
        key = (int(problem.pod_node[p]), int(problem.pod_signature[p]), problem.pod_pdbs[p])
        groups[key].append(int(p))
    out_col: dict[tuple[int, int, tuple[int, ...]], int] = {
        key: cols.add(0, min(len(pods), budget), -eps * cost_scale, True)
        for key, pods in groups.items()
    }
    out_upper = {c: min(len(groups[key]), budget) for key, c in out_col.items()}
    moving_signatures = sorted({key[1] for key in groups})
    in_col: dict[tuple[int, int], int] = {}
    for k in moving_signatures:
        for n in np.nonzero(problem.admits[k])[0].tolist():
            in_col[(n, k)] = cols.add(0, budget, 0.0, True)

    n_nodes, n_res = problem.free.shape
    out_by_node: defaultdict[int, list[tuple[int, int]]] = defaultdict(list)
    for (n, k, _), c in out_col.items():
        out_by_node[n].append((c, k))
    in_by_node: defaultdict[int, list[tuple[int, int]]] = defaultdict(list)
    for (n, k), c in in_col.items():
        in_by_node[n].append((c, k))
    req = problem.signature_requests
    free_col = np.empty((n_nodes, n_res), dtype=np.int64)
    for n in range(n_nodes):
        for r in range(n_res):
            free_col[n, r] = cols.add(0, _INF, 0.0, False)
            terms = [(int(free_col[n, r]), 1.0)]
            terms += [(c, req[k, r] / unit[r]) for c, k in in_by_node[n] if req[k, r]]
            terms += [(c, -req[k, r] / unit[r]) for c, k in out_by_node[n] if req[k, r]]
            value = problem.free[n, r] / unit[r]
            rows.add(terms, value, value)

    patterns = _leaving_patterns(problem, objective, out_by_node, out_upper, max_patterns, cols)
    for n, (z_cols, counts, _) in patterns.items():
        # Which pods leave n is one of its patterns (or none): out is their sum.
        rows.add([(z, 1.0) for z in z_cols], -_INF, 1.0)
        for i, (c, _) in enumerate(out_by_node[n]):
            pairs = zip(z_cols, counts[:, i], strict=True)
            terms = [(c, 1.0)] + [(z, -float(m)) for z, m in pairs if m]
            rows.add(terms, 0.0, 0.0)

    empty_fits = objective.fits(problem.capacity)
    fits_now = objective.fits(problem.free)
    y_col: dict[tuple[int, int], int] = {}
    demand = objective.demand
    for s in range(len(objective.shapes)):
        if objective.coef[s] <= 0:
            continue
        for n in np.nonzero(objective.mask[s])[0].tolist():
            if empty_fits[s, n] == 0:
                continue
            now = int(fits_now[s, n])
            asks = np.nonzero(demand[s])[0].tolist()
            if n in patterns:
                z_cols, _, pattern_fits = patterns[n]
                reach = max([now, *pattern_fits[s].tolist()])
            else:
                reach = int(empty_fits[s, n]) if out_by_node[n] else now
            cost = float(objective.coef[s]) * cost_scale
            y = cols.add(0, float(min(empty_fits[s, n], reach)), cost, True)
            y_col[(s, n)] = y
            for r in asks:
                rows.add([(y, demand[s, r] / unit[r]), (int(free_col[n, r]), -1.0)], -_INF, 0)
            if n in patterns:
                # The fits each pattern leaves (arrivals only take some away): the source side
                # of the LP is then exact, where the rows above alone let it count fractional
                # replicas on every node with a movable pod, percent above the optimum.
                gains = pattern_fits[s] - now
                pairs = zip(z_cols, gains, strict=True)
                terms = [(y, 1.0)] + [(z, -float(g)) for z, g in pairs if g > 0]
                rows.add(terms, -_INF, float(now))

    for k in moving_signatures:
        terms = [(c, 1.0) for key, c in out_col.items() if key[1] == k]
        terms += [(c, -1.0) for key, c in in_col.items() if key[1] == k]
        rows.add(terms, 0, 0)
    rows.add([(c, 1.0) for c in out_col.values()], -_INF, budget)
    pdb_terms: defaultdict[int, list[tuple[int, float]]] = defaultdict(list)
    for key, c in out_col.items():
        for pdb in key[2]:
            pdb_terms[pdb].append((c, 1.0))
    for pdb, terms in pdb_terms.items():
        rows.add(terms, -_INF, float(problem.pdb_allowed[pdb]))

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("threads", int(threads))
    h.setOptionValue("mip_rel_gap", 1e-6)
    h.setOptionValue("mip_heuristic_effort", heuristic_effort)
    n_cols = len(cols.lower)
    h.addVars(n_cols, np.array(cols.lower), np.array(cols.upper))
    all_cols = np.arange(n_cols, dtype=np.int32)
    h.changeColsCost(n_cols, all_cols, np.array(cols.cost))
    h.changeColsIntegrality(
        n_cols,
        all_cols,
        np.where(np.array(cols.integer) == 1, highspy.HighsVarType.kInteger.value, 0).astype(
            np.uint8
        ),
    )
    h.addRows(
        len(rows.lower),
        np.array(rows.lower),
        np.array(rows.upper),
        len(rows.index),
        np.array(rows.starts, dtype=np.int32),
        np.array(rows.index, dtype=np.int32),
        np.array(rows.value),
    )
    h.changeObjectiveSense(highspy.ObjSense.kMaximize)
    if start:
        solution = highspy.HighsSolution()
        solution.col_value = _start_values(
            problem,
            objective,
            start,
            n_cols,
            (out_col, in_col, y_col, free_col, patterns, out_by_node),
        ).tolist()
        h.setSolution(solution)
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    info = h.getInfo()
    untouched = float(objective.coef @ objective.fits(problem.free).sum(axis=1))
    bound = float(info.mip_dual_bound) / cost_scale + eps * budget
    score_bound = max(bound, untouched) if math.isfinite(bound) else None
    label = "optimal" if status == "Optimal" else status.lower().replace(" ", "-")
    if info.primal_solution_status != 2:
        # No incumbent within the time limit (moving nothing is legal: that is the plan).
        return SolverResult("mip", (), f"{label}-no-incumbent", score_bound=score_bound)
    x = np.rint(np.array(h.getSolution().col_value)).astype(np.int64)
    return SolverResult(
        "mip",
        tuple(_pair_flows(problem, groups, out_col, in_col, x)),
        label,
        score_bound=score_bound,
    )


def _pair_flows(
    problem: RebalanceProblem,
    groups: dict[tuple[int, int, tuple[int, ...]], list[int]],
    out_col: dict[tuple[int, int, tuple[int, ...]], int],
    in_col: dict[tuple[int, int], int],
    x: np.ndarray,
) -> list:
    """Concrete moves: leaving pods paired with arriving slots of their signature.

    A pod of signature k leaving a node that also receives one of k would be a move that changes
    nothing; such pairs are cancelled first.
    """
    leaving: defaultdict[tuple[int, int], list[int]] = defaultdict(list)
    for key, c in out_col.items():
        leaving[(key[0], key[1])] += groups[key][: int(x[c])]
    arriving: defaultdict[int, list[int]] = defaultdict(list)
    for (n, k), c in in_col.items():
        count = int(x[c])
        stay = min(count, len(leaving.get((n, k), [])))
        if stay:
            leaving[(n, k)] = leaving[(n, k)][stay:]
        arriving[k] += [n] * (count - stay)
    pairs = []
    for (_, k), pods in sorted(leaving.items()):
        for p in pods:
            pairs.append((p, arriving[k].pop()))
    return problem.moves_from_indices(pairs)


def _resource_units(problem: RebalanceProblem) -> np.ndarray:
    """Per resource, the unit the MIP's rows count it in: the largest capacity / 64, >= 1."""
    return np.maximum(1.0, problem.capacity.max(axis=0, initial=0) / 64.0)


def _leaving_patterns(
    problem: RebalanceProblem,
    objective: FragmentationObjective,
    out_by_node: Mapping[int, list[tuple[int, int]]],
    out_upper: Mapping[int, int],
    max_patterns: int,
    cols: _Columns,
) -> dict[int, tuple[list[int], np.ndarray, np.ndarray]]:
    """Per node, every way its movable pods can leave within the budget (a count per group,
    not all zero), as binary columns; with each pattern's counts and the fits it leaves.

    node -> (pattern columns, counts (patterns, groups at the node), fits (shapes, patterns)).
    Nodes with more than `max_patterns` patterns are left out.
    """
    budget = problem.rules.move_budget
    req = problem.signature_requests
    found: dict[int, tuple[list[int], np.ndarray, np.ndarray]] = {}
    for n, leaving in out_by_node.items():
        uppers = [out_upper[c] for c, _ in leaving]
        if not leaving or math.prod(u + 1 for u in uppers) - 1 > max_patterns:
            continue
        counts = np.array(
            [
                combo
                for combo in itertools.product(*(range(u + 1) for u in uppers))
                if 0 < sum(combo) <= budget
            ],
            dtype=np.int64,
        ).reshape(-1, len(leaving))
        freed = counts @ req[[k for _, k in leaving]]
        fits = objective.fits(problem.free[n] + freed, np.full(len(counts), n))
        z_cols = [cols.add(0, 1, 0.0, True) for _ in range(len(counts))]
        found[n] = (z_cols, counts, fits)
    return found


def _start_values(
    problem: RebalanceProblem,
    objective: FragmentationObjective,
    moves: Sequence[Move],
    n_cols: int,
    columns: tuple[Any, ...],
) -> np.ndarray:
    """Every column's value for the legal plan `moves` (a MIP start)."""
    out_col, in_col, y_col, free_col, patterns, out_by_node = columns
    x = np.zeros(n_cols)
    leaving: defaultdict[int, int] = defaultdict(int)
    for move in moves:
        p = problem.pod_index[move.pod]
        k = int(problem.pod_signature[p])
        c = out_col[(int(problem.pod_node[p]), k, problem.pod_pdbs[p])]
        leaving[c] += 1
        x[c] += 1
        x[in_col[(problem.node_index[move.target], k)]] += 1
    free = problem.free_after(moves)
    x[free_col.ravel()] = (free / _resource_units(problem)).ravel()
    fits = objective.fits(free)
    for (s, n), c in y_col.items():
        x[c] = fits[s, n]
    for n, (z_cols, counts, _) in patterns.items():
        vector = [leaving.get(c, 0) for c, _ in out_by_node[n]]
        match = np.nonzero((counts == vector).all(axis=1))[0]
        if match.size:
            x[z_cols[int(match[0])]] = 1
    return x
