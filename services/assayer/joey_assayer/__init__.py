"""Placeholder: assayer lands in a later issue (see docs/architecture.md)."""
