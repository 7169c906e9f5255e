"""kanband: a supervisor daemon that runs a durable task board.

This package's top level stays import-light: kanbanctl imports the protocol,
path and error modules from here and must not pull asyncio, structlog or
psutil in with them.
"""

__version__ = "0.1.0"
