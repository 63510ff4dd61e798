"""``python -m lmcodec``: the ``lmcodec`` command, as ``python -m gzip`` runs gzip."""

from .cli.main import main

if __name__ == "__main__":
    main(prog_name="lmcodec")
