"""`python -m joey_connector_bridge`: the connector-bridge in the foreground, as `joey serve
connector-bridge` runs it."""

from joey_connector_bridge.app import serve

if __name__ == "__main__":
    serve()
