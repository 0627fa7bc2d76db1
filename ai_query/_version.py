"""The one place the package version is written (``ai_query.__version__``, the transport's User-Agent)."""

__version__ = "0.1.0"
