"""The services, in the order `joey up` starts them; `joey serve` runs one. Its own module, so that the
command line names them without loading the stack's code."""

SERVICES = ("registry", "engine", "logger", "assayer", "gateway")

DATABASE_SERVICES = frozenset({"registry", "logger", "assayer"})
"""The services given the database URL; the others (engine, gateway) use no database."""
