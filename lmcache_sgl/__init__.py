"""lmcache-sgl: a KV-cache hierarchy (CPU memory, local disk) for SGLang."""

__version__ = "0.1.0"
