"""`python -m joey_assayer`: the assayer service in the foreground, as `joey serve assayer` runs it."""

from joey_assayer.app import serve

if __name__ == "__main__":
    serve()
