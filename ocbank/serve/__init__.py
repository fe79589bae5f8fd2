"""``ocbank serve``: the banks of a folder behind an HTTP API on Ray Serve.

Layer: above :mod:`ocbank.jobs`, below the CLI. The pure parts (options, the API's
errors and responses, bank validation, scoring runtimes) import no Ray; only
:mod:`ocbank.serve.app` and :mod:`ocbank.serve.server` need the ``serve`` extra.
"""

from .options import ServeOptions

__all__ = ["ServeOptions"]
