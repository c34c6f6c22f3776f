"""Placeholder: connector-bridge lands in a later issue (see docs/architecture.md)."""
