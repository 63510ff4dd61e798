"""Scale-out on Ray (docs/SCALE.md): the executor that sends blocks to workers, and the worker actor.
Imported only with ``--cluster``; needs the ``lmcodec[cluster]`` extra."""
