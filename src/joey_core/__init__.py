"""The shared core of Joey's services: settings, topic names, record codecs, the Kafka loop toolkit,
the database and its migrations, heartbeats, expressions, drift math (:mod:`joey_core.assays`) and
the generated gRPC stubs.

It imports neither the SDK (:mod:`joey.client`) nor the CLI (:mod:`joey_cli`); the services import
only this package and the standard libraries (``make lint`` checks both).
"""

__version__ = "0.1.0"
