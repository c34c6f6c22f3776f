"""`python -m joey_engine`: the engine service in the foreground, as `joey serve engine` runs it."""

from joey_engine.app import serve

if __name__ == "__main__":
    serve()
