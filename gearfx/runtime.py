"""Drive a rewritten decoder: prefill, decode step by step, generate; report the cache's memory."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
from torch.export import ExportedProgram

from gearfx.capture import Decoder
from gearfx.compress.layout import fp16_bytes
from gearfx.passes import use_kernels
from gearfx.passes.rewrite_kv import STATE_PREFIX
from gearfx.recipes import Recipe


class CacheOverflowError(RuntimeError):
    """More tokens than the cache was compiled for (max_cache_len)."""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of the compressed cache by component, next to an fp16 cache of the same capacity."""

    recipe: str
    components: dict[str, int]  # state tensor kind ("key.codes", "window.value", ...) -> bytes
    fp16_bytes: int

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def ratio(self) -> float:
        return self.total / self.fp16_bytes

    def __str__(self) -> str:
        lines = [f"KV cache memory, recipe {self.recipe!r}:"]
        for name, n in sorted(self.components.items()):
            lines.append(f"  {name:22s} {n / 2**20:10.3f} MiB")
        lines.append(f"  {'total':22s} {self.total / 2**20:10.3f} MiB  = {self.ratio:.3f}x the fp16 cache "
                     f"({self.fp16_bytes / 2**20:.3f} MiB)")
        return "\n".join(lines)


class CompiledModel:
    """A decoder whose KV cache is the recipe's compressed cache.

    With compile=True the program runs under Inductor, its attention sites calling the opaque
    gearfx::attend_kernel; with compile=False it runs eagerly on the reference op. Position
    state lives here: `prefill` starts a sequence batch, `decode` appends one token per row.
    Everything runs on `device`, the device of the cache state (the model's): inputs on another
    device are moved there, and logits and tokens are returned there.
    """

    def __init__(self, decoder: Decoder, program: ExportedProgram, recipe: Recipe,
                 cache_shape: tuple[int, int, int, int, int], compile: bool = True):
        self.recipe = recipe
        self.cache_shape = cache_shape  # (layers, B, H_kv, max_cache_len, D) of the original cache
        self.program = program
        self.batch_size = decoder.batch_size
        self.max_cache_len = decoder.max_cache_len
        self._takes_mask = decoder.takes_mask
        self.eos_token_ids, self.pad_token_id = decoder.eos_token_ids, decoder.pad_token_id
        if compile:
            self._module = use_kernels(program).module()
            # The module is this object's own (from the program) and never changes: dynamo's guards
            # on its ~800 parameters and buffers cost 0.9 ms a SmolLM2 decode step, for nothing
            self._step = torch.compile(self._module, dynamic=True,
                                       options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        else:
            self._module = program.module()
            self._step = self._module
        self.device = next(b for n, b in self._module.named_buffers() if n.startswith(STATE_PREFIX)).device
        self._position = 0
        self._mask = None  # [B, max_cache_len] for transformers models: 1 = real token
        self._next_pos = None  # [B, 1] next position id of each row

    # ---- stepping ----

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if self._position + length > self.max_cache_len:
            raise CacheOverflowError(
                f"cache full: {self._position} tokens cached + {length} new > max_cache_len="
                f"{self.max_cache_len}; compile with a larger max_cache_len")
        cache_position = torch.arange(self._position, self._position + length, device=self.device)
        input_ids = input_ids.contiguous()  # the graph guards on strides: a sliced prompt recompiled it
        # On a compiled graph's first run AOTAutograd checks its custom ops for aliasing under a
        # dispatch mode, which hides the inputs' autograd keys from the site kernel compiled inside
        # that run: its dynamo guards then failed on the second call and every kernel compiled
        # twice (SmolLM2: +15 s at the second prefill, +6 s at the second decode step, with the FX
        # graph cache already holding them). Our op's output is always a new tensor; nothing to check.
        with torch.no_grad(), torch._functorch.config.patch(check_custom_op_aliasing=False):
            if self._takes_mask:
                logits = self._step(input_ids=input_ids, attention_mask=self._mask,
                                    position_ids=positions, cache_position=cache_position)
            else:
                logits = self._step(input_ids, cache_position)
        self._position += length
        return logits

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start new sequences. input_ids [B, L], left-padded where attention_mask [B, L] is 0.
        Returns logits [B, L, V] ([B, 1, V] from a decoder captured with last_logits_only)."""
        b, length = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"batch of {b} rows; this model was compiled for batch_size={self.batch_size}")
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        if not self._takes_mask and not bool(attention_mask.all()):
            raise ValueError("this module takes no attention mask, so it cannot run padded batches")
        self._position = 0
        self._mask = torch.zeros(b, self.max_cache_len, dtype=torch.long, device=self.device)
        self._mask[:, :length] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        self._next_pos = positions[:, -1:] + 1
        return self._run(input_ids, positions)

    def decode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row: input_ids [B, 1]. Returns logits [B, 1, V]."""
        if self._mask is None:
            raise RuntimeError("decode before prefill: start a sequence with prefill()")
        if self._position < self.max_cache_len:
            self._mask[:, self._position] = 1
        positions = self._next_pos
        logits = self._run(input_ids.to(self.device), positions)
        self._next_pos = positions + 1
        return logits

    # ---- generation ----

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every row ([B] int64) as it is produced, until max_new_tokens or
        every row has produced an end-of-sequence token (finished rows then yield the pad token)."""
        if input_ids.shape[1] + max_new_tokens - 1 > self.max_cache_len:
            raise CacheOverflowError(
                f"prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new tokens needs "
                f"{input_ids.shape[1] + max_new_tokens - 1} cache slots > max_cache_len={self.max_cache_len}")
        pick = _sampler(do_sample, temperature, top_p, top_k, seed, self.device)
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=self.device)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=self.device)
        logits = self.prefill(input_ids, attention_mask)[:, -1]
        for i in range(max_new_tokens):
            token = pick(logits)
            if self.pad_token_id is not None:
                token = token.masked_fill(finished, self.pad_token_id)
            yield token
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or i + 1 == max_new_tokens:
                return
            logits = self.decode(token[:, None])[:, -1]

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, on_token: Callable[[torch.Tensor], None] | None = None,
                 **sampling) -> torch.Tensor:
        """Prompt + new tokens, [B, L + up to max_new_tokens], on `device`; greedy unless
        do_sample=True (see `stream`)."""
        new = []
        for token in self.stream(input_ids, attention_mask, max_new_tokens=max_new_tokens, **sampling):
            new.append(token)
            if on_token is not None:
                on_token(token)
        return torch.cat([input_ids.to(self.device), torch.stack(new, dim=1)], dim=1)

    # ---- memory ----

    def memory_report(self) -> MemoryReport:
        """Bytes of the state buffers actually allocated, by component, vs an fp16 cache."""
        components: dict[str, int] = {}
        for name, buf in self._module.named_buffers():
            if name.startswith(STATE_PREFIX):
                kind = name.split("_", 2)[2].replace("_", ".", 1)  # gearfx_3_key_codes -> key.codes
                components[kind] = components.get(kind, 0) + buf.numel() * buf.element_size()
        layers, b, h, t, d = self.cache_shape
        return MemoryReport(self.recipe.name, components, fp16_bytes(layers, b, h, d, t))


def _sampler(do_sample: bool, temperature: float, top_p: float, top_k: int, seed: int | None,
             device: torch.device):
    """A function logits [B, V] -> tokens [B]: argmax, or seeded temperature/top-k/top-p sampling."""
    if not do_sample:
        return lambda logits: logits.argmax(dim=-1)
    if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0; got "
                         f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
    generator = torch.Generator(device)
    if seed is not None:
        generator.manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    return pick
