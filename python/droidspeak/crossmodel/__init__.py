"""Cross-model KV reuse (DroidSpeak): per-pair profiles of which contiguous layer
group a receiver must recompute over a sender's KV, the runtime policy that picks
a group per request, and the offline profiler that measures them."""
