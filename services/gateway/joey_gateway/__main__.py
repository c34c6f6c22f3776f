"""`python -m joey_gateway`: the gateway service in the foreground, as `joey serve gateway` runs it."""

from joey_gateway.app import serve

if __name__ == "__main__":
    serve()
