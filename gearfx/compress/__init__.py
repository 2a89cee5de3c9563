"""Compression math as pure functions on tensors: quantize (torchao), lowrank, sparse, gear (one
chunk through all three), h2o (eviction), sinks (which tokens are kept exactly), layout (state
tensors and their exact bytes)."""
