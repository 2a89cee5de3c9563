"""Compression math as pure functions on tensors: quantize (torchao), lowrank, sparse, gear (one
chunk through all three), h2o (eviction), layout (state tensors and their exact bytes)."""
