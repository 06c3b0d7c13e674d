"""The engine: evicting cache layers, the attention function that feeds them, and patching."""

from momentkv.engine.cache import EvictingCache
from momentkv.engine.layer import EvictingLayer
from momentkv.engine.patch import Handle, handle_of, patch, patched, unpatch

__all__ = ["EvictingCache", "EvictingLayer", "Handle", "handle_of", "patch", "patched", "unpatch"]
