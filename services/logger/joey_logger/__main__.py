"""`python -m joey_logger`: the logger service in the foreground, as `joey serve logger` runs it."""

from joey_logger.app import serve

if __name__ == "__main__":
    serve()
