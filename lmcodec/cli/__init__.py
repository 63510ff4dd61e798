"""The command line (docs/CLI.md): subcommands (:mod:`.main`), the gzip/zstd drop-in form
(:mod:`.compat`), ``train`` and ``probe``, and the helpers they share (:mod:`.common`)."""
