"""`python -m joey_registry`: the registry service in the foreground, as `joey serve registry` runs it."""

from joey_registry.app import serve

if __name__ == "__main__":
    serve()
