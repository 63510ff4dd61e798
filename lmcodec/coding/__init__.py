"""Bytes to archive payloads and back: tokens, integer frequencies, the range coder, the online
models, the runner of model passes, the row scheduler and decoder, and the block encoder and decoder
with the settings and model cache they run on.  Built on :mod:`lmcodec.engine` and
:mod:`lmcodec.format`."""
