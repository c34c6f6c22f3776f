"""Data connections: the details of an external source or sink, one type per module.

The registry validates, seals and tests them; the connector-bridge will read and write through the
same types. A type is a :class:`ConnectionType` registered under its name (:func:`connection_type`):
``postgres``, ``kafka``, ``files``, ``s3`` and ``http``.
"""

# Importing each type's module registers it.
from joey_core.connections import files, http, kafka, postgres, s3  # noqa: E402, F401, I001
from joey_core.connections.base import (
    TYPES,
    ConnectionType,
    InvalidDetails,
    Probe,
    Report,
    connection_type,
    register,
)
from joey_core.connections.policy import TestPolicy, TestRefused
from joey_core.connections.sealing import Sealer, SecretKeyError, redacted, secret_paths, secret_values

__all__ = [
    "TYPES",
    "ConnectionType",
    "InvalidDetails",
    "Probe",
    "Report",
    "Sealer",
    "SecretKeyError",
    "TestPolicy",
    "TestRefused",
    "connection_type",
    "redacted",
    "register",
    "secret_paths",
    "secret_values",
]
