"""Export a decoder step with static KV buffers, ready for the gearfx passes.

Two kinds of decoder:
- transformers causal LMs, wrapped in `HFDecoder`: a StaticCache whose layer tensors are module
  buffers, driven by an attention mask over the whole cache (so left padding works) and explicit
  position ids. Sliding-window layers get full-length caches: the model's own mask keeps them
  inside their window, and the compressed cache stays positional for every layer.
- any `nn.Module` that keeps its cache in buffers [B, H_kv, T, D] (gpt-fast style) and is called
  as `module(input_ids [B, L], cache_position [L]) -> logits [B, L, V]`.

One program is exported, with a dynamic sequence length: prompts of any length and single-token
decode steps run through it (torch.compile specialises the L = 1 case into its own graph). It is
exported on the device of the model's parameters (or of a plain module's cache buffers).

A transformers decoder can be captured to return the last position's logits only
(`last_logits_only`, the model's `logits_to_keep=1`, as `generate` does): a prompt then costs no
[B, L, vocab] logits (1 GB a row at 4096 tokens and a 128k vocabulary in fp16).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.export import Dim, ExportedProgram


class HFDecoder(nn.Module):
    """A transformers causal LM with a static cache held in buffers key_cache_i / value_cache_i."""

    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int, last_logits_only: bool = False):
        super().__init__()
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.model = model
        self.logits = {"logits_to_keep": 1} if last_logits_only else {}
        config = model.config.get_text_config()
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        self.cache.layers = [StaticLayer(max_cache_len) for _ in self.cache.layers]
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.cache.early_initialization(batch_size, heads, head_dim, dtype, device)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            if hasattr(layer, "cumulative_length"):  # not in transformers 5.0 (see forward)
                self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, cache_position):
        """input_ids, position_ids [B, L]; attention_mask [B, max_cache_len] (1 where a real token is
        or will be cached); cache_position [L]. Returns logits [B, L, V] ([B, 1, V] with
        last_logits_only)."""
        # transformers >= 5.x: each layer counts its cached tokens (set here from the positions);
        # 5.0 takes cache_position instead and would otherwise derive it by reading the cache
        counted = hasattr(self.cache.layers[0], "cumulative_length")
        for layer in self.cache.layers if counted else ():
            layer.cumulative_length.copy_(cache_position[0])
        positions = {} if counted else {"cache_position": cache_position}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=self.cache, use_cache=True, **positions, **self.logits).logits


@dataclasses.dataclass(frozen=True)
class Decoder:
    """An exported decoder step and what the runtime needs to drive it."""

    program: ExportedProgram
    batch_size: int
    max_cache_len: int
    takes_mask: bool  # HF decoders take attention_mask + position_ids; plain modules do not
    eos_token_ids: tuple[int, ...] = ()  # generation stops once every row has produced one
    pad_token_id: int | None = None  # what finished rows emit until the others finish


def _special_tokens(model: nn.Module) -> tuple[tuple[int, ...], int | None]:
    eos = model.generation_config.eos_token_id
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    pad = model.generation_config.pad_token_id
    return eos, pad if pad is not None else (eos[0] if eos else None)


def is_transformers_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "generation_config")


def export_decoder(model: nn.Module, batch_size: int | None = None, max_cache_len: int | None = None,
                   last_logits_only: bool = False) -> Decoder:
    """Export `model` (see the module docstring) with a dynamic sequence length."""
    with torch.no_grad():
        if is_transformers_model(model):
            if batch_size is None or max_cache_len is None:
                raise ValueError("a transformers model needs batch_size and max_cache_len")
            module = HFDecoder(model.eval(), batch_size, max_cache_len, last_logits_only)
            device = next(model.parameters()).device
            seq = Dim("seq", min=1, max=max_cache_len - 1)
            example = dict(
                input_ids=torch.zeros(batch_size, 2, dtype=torch.long, device=device),
                attention_mask=torch.ones(batch_size, max_cache_len, dtype=torch.long, device=device),
                position_ids=torch.arange(2, device=device).expand(batch_size, 2),
                cache_position=torch.arange(2, device=device),
            )
            shapes = dict(input_ids={1: seq}, attention_mask=None, position_ids={1: seq}, cache_position={0: seq})
            # strict: the model reaches its cache through the StaticCache object, not the module's
            # buffer table; only dynamo sees that these are the same tensors as the buffers.
            ep = torch.export.export(module, (), example, dynamic_shapes=shapes, strict=True)
            _release_cache(ep, len(module.cache.layers))
            return Decoder(ep, batch_size, max_cache_len, True, *_special_tokens(model))
        if last_logits_only:
            raise ValueError(f"last_logits_only needs a transformers model (its logits_to_keep argument); "
                             f"{type(model).__name__} returns the logits of every position")
        caches = [b for b in model.buffers() if b.dim() == 4]
        if not caches:
            raise ValueError(f"{type(model).__name__} has no rank-4 KV cache buffers [B, H_kv, T, D]")
        b, _, t, _ = caches[0].shape
        if (batch_size or b) != b or (max_cache_len or t) != t:
            raise ValueError(f"{type(model).__name__}'s cache buffers are [B={b}, T={t}]; a plain module's "
                             "batch size and capacity are those of its buffers")
        seq = Dim("seq", min=1, max=t - 1)
        device = caches[0].device
        example = (torch.zeros(b, 2, dtype=torch.long, device=device), torch.arange(2, device=device))
        ep = torch.export.export(model.eval(), example, dynamic_shapes=({1: seq}, {0: seq}))
        return Decoder(ep, b, t, takes_mask=False)


def _release_cache(ep: ExportedProgram, layers: int) -> None:
    """Free the memory of the StaticCache that was traced (layers x B x capacity, both K and V).

    Dynamo keeps the traced module, and with it that cache, alive for the rest of the process (a
    global of the code it generates), while the program needs only the cache's shape: every
    recipe replaces it (`rewrite_kv`). So its storage is released, and the program keeps zeros of
    the same shape that take no memory (one element, stride 0); the captured program itself is
    for `gearfx.compile` / `export`, which replace them, not for running as is.
    """
    for i in range(layers):
        for name in (f"key_cache_{i}", f"value_cache_{i}"):
            traced = ep.constants[name]
            ep.constants[name] = traced.new_zeros(()).expand(traced.shape)
            traced.untyped_storage().resize_(0)
