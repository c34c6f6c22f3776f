"""`python -m joey_orchestrator`: the orchestrator in the foreground, as `joey serve orchestrator` runs it."""

from joey_orchestrator.app import serve

if __name__ == "__main__":
    serve()
