"""`tessera plan`: run the placement planner on files, without a cluster."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TypeVar

import click
import yaml
from rich.console import Console
from rich.table import Table

from tessera.api.accelerator_class import AcceleratorClass
from tessera.api.common import CustomResource
from tessera.api.loader import InvalidResourceError, load_kind
from tessera.api.model_deployment import ModelDeployment, Plan, PoolRole
from tessera.cli_params import assignments
from tessera.policies.capacity import ClassOffer
from tessera.policies.placement import (
    Candidate,
    InfeasiblePlanError,
    plan_deployment,
    ranked_candidates,
)


def parse_capacity(values: tuple[str, ...]) -> dict[str, int]:
    """`--capacity h100=16` options as a mapping; a usage error for a malformed one."""
    return assignments(values, "--capacity", _count, "COUNT")


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"expected CLASS=COUNT with COUNT a whole number >= 0, got {text!r}")
    return int(text)


def _load(paths: tuple[Path, ...], kind: type[R], param_hint: str) -> list[R]:
    """Every resource of `kind` in the files, or a usage error naming the flag."""
    try:
        found = load_kind(paths, kind)
    except InvalidResourceError as error:
        raise click.BadParameter(str(error), param_hint=param_hint) from error
    if not found:
        where = ", ".join(map(str, paths))
        raise click.BadParameter(f"no {kind.crd.kind} in {where}", param_hint=param_hint)
    return found


R = TypeVar("R", bound=CustomResource)


def plan_table(deployment: ModelDeployment, plan: Plan) -> Table:
    table = Table(title=f"Plan for {deployment.metadata.name}: {plan.mode.value}")
    left = ("pool", "role", "class", "prefill")
    columns = ("pool", "role", "class", "TP", "replicas", "prefill", "max seqs")
    for column in (*columns, "req/s", "tokens/s", "util"):
        table.add_column(column, justify="left" if column in left else "right")
    for pool in plan.pools:
        load = pool.predicted_load
        prefills = pool.role in (PoolRole.COLOCATED, PoolRole.PREFILL)
        table.add_row(
            pool.name,
            pool.role.value,
            pool.accelerator_class,
            str(pool.tensor_parallel),
            str(pool.replicas),
            prefill_label(pool.prefill_chunk_tokens) if prefills else "-",
            str(pool.max_running_requests or "-"),
            f"{load.request_rate_per_second:g}" if load else "-",
            f"{load.tokens_per_second:g}" if load else "-",
            f"{load.utilization:.0%}" if load else "-",
        )
    table.caption = (
        f"{plan.accelerators} accelerators, {plan.cost_per_hour:g}/h, {plan.power_w:g} W; "
        f"predicted TTFT {plan.predicted_ttft_ms} ms, TPOT {plan.predicted_tpot_ms} ms, "
        f"attainment {_percent(plan.predicted_attainment)} (simulated "
        f"{_percent(plan.simulated_attainment)})\n"
        f"{plan.rationale}"
    )
    return table


def prefill_label(chunk_tokens: int | None) -> str:
    return "whole prompts" if chunk_tokens is None else f"chunked {chunk_tokens}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def alternatives_table(candidates: list[Candidate]) -> Table:
    table = Table(title="Top alternatives (best first)")
    columns = ("#", "mode", "pools", "accelerators", "cost/h", "power W", "TTFT ms", "TPOT ms")
    for column in (*columns, "attain."):
        table.add_column(column, justify="left" if column in ("mode", "pools") else "right")
    for rank, candidate in enumerate(candidates, start=1):
        table.add_row(
            str(rank),
            candidate.mode_label,
            "\n".join(
                f"{n}x {s.role.value} {s.offer.name} TP{s.tensor_parallel}"
                + (
                    f" +{s.attention_devices}x {s.attention_offer.name}"
                    if s.attention_offer
                    else ""
                )
                for s, n in candidate.pools
            ),
            str(candidate.accelerators),
            f"{candidate.cost_per_hour:.2f}",
            f"{candidate.power_w:.0f}",
            f"{candidate.ttft_ms:.0f}",
            f"{candidate.tpot_ms:.1f}",
            _percent(candidate.attainment),
        )
    return table


@click.command("plan")
@click.option(
    "-f",
    "--filename",
    "deployment_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file with the ModelDeployment(s).",
)
@click.option(
    "--classes",
    "class_files",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file(s) with AcceleratorClasses.",
)
@click.option(
    "--capacity",
    multiple=True,
    help="Free accelerators of a class, CLASS=COUNT (repeatable); unbounded when omitted.",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "yaml", "json"]),
    default="table",
    show_default=True,
)
@click.option("--explain", is_flag=True, help="Also print the top alternatives with their scores.")
@click.option(
    "--simulate",
    "simulate_candidates",
    is_flag=True,
    help="Simulate the cheapest candidates (short seeded runs at the declared rate) before "
    "choosing, as the operator and `tessera simulate` do.",
)
def plan_command(
    deployment_file: Path,
    class_files: tuple[Path, ...],
    capacity: tuple[str, ...],
    output: str,
    explain: bool,
    simulate_candidates: bool,
) -> None:
    """Plan each ModelDeployment in FILENAME on the AcceleratorClasses in CLASSES."""
    free = parse_capacity(capacity)
    deployments = _load((deployment_file,), ModelDeployment, "-f/--filename")
    classes = _load(class_files, AcceleratorClass, "--classes")
    unknown = sorted(set(free) - {c.metadata.name for c in classes})
    if unknown:
        raise click.BadParameter(
            f"no AcceleratorClass {', '.join(unknown)} in --classes "
            f"(defined: {', '.join(sorted(c.metadata.name for c in classes))})",
            param_hint="--capacity",
        )
    offers = [ClassOffer.from_resource(c, free.get(c.metadata.name)) for c in classes]
    console = Console(width=None if sys.stdout.isatty() else 140)
    plans: dict[str, object] = {}
    failed = False
    evaluator = None
    if simulate_candidates:
        from tessera.sim.evaluate import SimulatedEvaluator

        evaluator = SimulatedEvaluator.for_offers(offers)
    for deployment in deployments:
        try:
            plan = plan_deployment(deployment.spec, offers, evaluator)
        except InfeasiblePlanError as error:
            click.echo(f"{deployment.metadata.name}: {error}", err=True)
            failed = True
            continue
        if output == "table":
            console.print(plan_table(deployment, plan))
            if explain:
                console.print(alternatives_table(ranked_candidates(deployment.spec, offers)))
        plans[deployment.metadata.name] = plan.to_wire()
    if output == "json":
        click.echo(json.dumps(plans, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(plans, sort_keys=False), nl=False)
    if failed:
        raise SystemExit(1)
