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
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from tessera.policies.fragmentation import FragmentationObjective
from tessera.policies.rebalance_model import RebalanceProblem, SolverResult

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
) -> SolverResult:
    """The best plan HiGHS finds within `time_limit_s`; status says whether it is proven.

    `heuristic_effort` is HiGHS's mip_heuristic_effort (its default 0.05): more finds good
    plans sooner on large instances, at the cost of proving them.
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

    groups: defaultdict[tuple[int, int, tuple[int, ...]], list[int]] = defaultdict(list)
    for p in movable:
        key = (int(problem.pod_node[p]), int(problem.pod_signature[p]), problem.pod_pdbs[p])
        groups[key].append(int(p))
    out_col: dict[tuple[int, int, tuple[int, ...]], int] = {
        key: cols.add(0, min(len(pods), budget), -eps, True) for key, pods in groups.items()
    }
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
            terms += [(c, float(req[k, r])) for c, k in in_by_node[n] if req[k, r]]
            terms += [(c, -float(req[k, r])) for c, k in out_by_node[n] if req[k, r]]
            value = float(problem.free[n, r])
            rows.add(terms, value, value)

    empty_fits = objective.fits(problem.capacity)
    for s in range(len(objective.shapes)):
        if objective.coef[s] <= 0:
            continue
        for n in np.nonzero(objective.mask[s])[0].tolist():
            if empty_fits[s, n] == 0:
                continue
            y = cols.add(0, float(empty_fits[s, n]), float(objective.coef[s]), True)
            for r in np.nonzero(objective.demand[s])[0].tolist():
                rows.add(
                    [(y, float(objective.demand[s, r])), (int(free_col[n, r]), -1.0)], -_INF, 0
                )

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
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    info = h.getInfo()
    if info.primal_solution_status != 2:  # no feasible point (cannot happen: no moves is one)
        return SolverResult("mip", (), f"no-solution ({status})")
    x = np.rint(np.array(h.getSolution().col_value)).astype(np.int64)
    untouched = float(objective.coef @ objective.fits(problem.free).sum(axis=1))
    bound = float(info.mip_dual_bound) + eps * budget
    return SolverResult(
        "mip",
        tuple(_pair_flows(problem, groups, out_col, in_col, x)),
        "optimal" if status == "Optimal" else status.lower().replace(" ", "-"),
        score_bound=max(bound, untouched),
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
