"""The one `tessera` command.

Subcommands live next to the code they drive and are imported only when invoked, so that
`tessera plan` does not pay for importing torch, grpc or kopf.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command; each owner module defines its command.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "crds": ("tessera.api.crdgen", "crds_command"),
    "validate": ("tessera.api.loader", "validate_command"),
    "plan": ("tessera.plan_command", "plan_command"),
    "operator": ("tessera.operator.main", "operator_command"),
    "simulate": ("tessera.sim.cli", "simulate_command"),
    "agent": ("tessera.agents.cli", "agent_command"),
    "serve": ("tessera.agents.serving.cli", "serve_command"),
    "router": ("tessera.agents.router.cli", "router_command"),
    "drain": ("tessera.agents.serving.drain_hook", "drain_command"),
}

SUBCOMMAND_HELP: dict[str, str] = {
    "crds": "Generate the CustomResourceDefinitions in crds/ from the API models.",
    "validate": "Validate Tessera resources in YAML files against the API models.",
    "plan": "Plan a ModelDeployment on a set of AcceleratorClasses and print the plan.",
    "operator": "Run the Kubernetes operator (kopf).",
    "simulate": "Simulate a heterogeneous cluster serving a trace under Tessera's policies.",
    "agent": "Run the node agent (gRPC telemetry and control).",
    "serve": "Serve a model over an OpenAI-compatible HTTP API (the engine's pods run this).",
    "router": "Route a disaggregated ModelDeployment's requests: prefill, then decode.",
    "drain": "Drain the local server before its pod stops (the serving pods' preStop hook).",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target
        module = importlib.import_module(module_name)
        command = getattr(module, attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}.{attribute} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMAND_HELP.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="tessera-operator")
def main() -> None:
    """Tessera: LLM inference on heterogeneous accelerator fleets, at its SLO, at least cost."""
