"""The tiered KV store (CacheGen's storage side): KV that the radix tree evicts,
or that another engine computed, kept compressed in host RAM, on local disk and in
a shared Redis, found again chunk by chunk along a prompt's prefix, and streamed
back at the compression level that the link's bandwidth allows."""
