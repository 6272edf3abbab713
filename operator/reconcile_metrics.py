"""Prometheus metrics of ModelDeployment reconciles (`tessera operator --metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECONCILES = Counter(
    "tessera_operator_reconciles_total",
    "ModelDeployment reconciles, by outcome (PlanApplied, DryRun, Infeasible, InvalidSpec, "
    "ApplyFailed, Error).",
    ["outcome"],
)
RECONCILE_SECONDS = Histogram(
    "tessera_operator_reconcile_duration_seconds",
    "Wall time of one ModelDeployment reconcile: read, plan, apply, status.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
PRUNED = Counter(
    "tessera_operator_pruned_objects_total",
    "Children deleted because they are no longer in a deployment's plan.",
)
