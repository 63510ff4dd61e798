"""The memorization probe (docs/PROBE.md): per-token surprisal of a text under the exact engine,
and its HTML / PNG rendering."""
