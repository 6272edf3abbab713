"""Tessera: a Kubernetes operator for LLM inference on heterogeneous accelerator fleets.

The source folders `api/`, `policies/`, `operator/`, `agents/` and `sim/` are mapped into this
namespace by pyproject.toml (`operator` must never be a top-level package: it is a stdlib name).
"""

__version__ = "0.1.0"
