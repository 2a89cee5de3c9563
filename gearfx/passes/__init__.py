"""Graph passes over torch.export programs, each a pure function from program to program."""

from gearfx.passes.find_kv_sites import KVSite, UnsupportedGraphError, find_kv_sites
from gearfx.passes.rewrite_kv import rewrite_kv, state_target
from gearfx.passes.use_kernels import use_kernels

__all__ = ["KVSite", "UnsupportedGraphError", "find_kv_sites", "rewrite_kv", "state_target", "use_kernels"]
