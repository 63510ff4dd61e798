"""Dictionaries (docs/DICTIONARIES.md): integer adapters merged into the engine's weights at load,
and the float training that fits them (its result is stored, so float is allowed there)."""
