"""decodekit-mirostat: the Mirostat v2 sampler for decodekit (``sampler=mirostat``, settings
``tau`` and ``eta``) and a ``mirostat`` strategy."""

from decodekit_mirostat.mirostat import Mirostat

__all__ = ["Mirostat"]
