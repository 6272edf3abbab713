"""Shared sample resources for API and planner tests, read from the bundled examples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def chat_deployment() -> dict[str, Any]:
    """A fresh copy of the Llama-3-8B chat ModelDeployment document."""
    return copy.deepcopy(example_documents("llama3-8b-chat.yaml")[0])
