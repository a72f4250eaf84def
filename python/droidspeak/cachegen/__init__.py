"""CacheGen: KV-cache compression (codec.py); the tiered store and the adaptive
streamer build on it."""
