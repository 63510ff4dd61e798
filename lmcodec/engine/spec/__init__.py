"""The engine's specification in code: every constant and table docs/ENGINE.md names
(``constants``, ``fixedmath``) and the plain int64 reference that executes it line by line
(``reference``), which the tests hold every backend to.  Imports nothing above it."""
