"""tessera.operator: the Kubernetes glue (kopf handlers, rendering, apply, status).

This folder is mapped to `tessera.operator` by pyproject.toml. It is never meant to be the
top-level module `operator`; but Python puts the current directory first on sys.path for
`python -m ...` and `python -c ...`, and then this folder would shadow the standard library's
`operator` (which `collections` imports at start-up) in any command run from the repo root.
When that happens this file turns itself into the standard library module, so such commands
keep working.
"""

if __name__ == "operator":  # pragma: no cover - only when the repo root is on sys.path
    import os as _os

    _stdlib_operator = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    with open(_stdlib_operator, encoding="utf-8") as _source:
        exec(compile(_source.read(), _stdlib_operator, "exec"))
