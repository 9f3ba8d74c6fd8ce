"""The request engine: requests with their own settings, decoded in one continuously refilled batch.

``Engine(model, tokenizer).run(requests)`` yields a :class:`RequestOutput` per
:class:`Request`; see :mod:`decodekit.engine.engine` and docs/engine.md.
"""

from decodekit.engine.engine import Engine, QueueFull
from decodekit.engine.request import Request, RequestOutput

__all__ = ["Engine", "QueueFull", "Request", "RequestOutput"]
