"""Adapters that plug ocbank into other frameworks (each an optional extra).

Nothing here is imported by ``import ocbank``: ``ocbank.integrations.anomalib`` needs
``pip install 'ocbank[anomalib]'`` and is imported only when asked for.
"""
