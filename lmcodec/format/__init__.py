"""The archive's bytes (docs/FORMAT.md): the header and the container of blocks and streams.
Knows nothing about models: it records their fingerprints and checks, and parses what it is given."""
