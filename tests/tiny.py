"""Tiny random decoders for tests: transformers configs of six families, and a gpt-fast style
plain nn.Module with its KV cache in buffers. head_dim is 64, as on the real model, so the shipped
recipes apply unchanged."""

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "gemma3", "phi3")


def hf(name: str, attn: str = "sdpa", layers: int = 2):
    import transformers as t

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if name == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**common))
    elif name == "qwen2":
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**common))
    elif name == "mistral":
        model = t.MistralForCausalLM(t.MistralConfig(**common, sliding_window=16))
    elif name == "phi3":
        model = t.Phi3ForCausalLM(t.Phi3Config(**common, pad_token_id=0))
    elif name == "gemma3":
        cfg = t.Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, head_dim=64, sliding_window=16,
                                 layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        model = t.Gemma3ForCausalLM(cfg)
    elif name == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=256, n_embd=128, n_layer=layers, n_head=2,
                                               n_positions=512, bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(name)
    model.config._attn_implementation = attn
    return model.eval()


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, batch, capacity, write):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.write = heads, kv_heads, dim // heads, write
        self.wqkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.register_buffer("k_cache", torch.zeros(batch, kv_heads, capacity, self.head_dim))
        self.register_buffer("v_cache", torch.zeros(batch, kv_heads, capacity, self.head_dim))

    def forward(self, x, mask, pos):
        b, length, _ = x.shape
        d = self.head_dim
        q, k, v = self.wqkv(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], -1)
        q = q.view(b, length, self.heads, d).transpose(1, 2)
        k = k.view(b, length, self.kv_heads, d).transpose(1, 2)
        v = v.view(b, length, self.kv_heads, d).transpose(1, 2)
        if self.write == "index_put":  # gpt-fast's slice assignment
            self.k_cache[:, :, pos] = k
            self.v_cache[:, :, pos] = v
        else:
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, length, -1))


class GptFast(nn.Module):
    """A minimal gpt-fast style decoder: called as model(input_ids [B, L], cache_position [L])."""

    def __init__(self, batch=2, capacity=64, write="index_put", layers=2, dim=256, heads=4, kv_heads=2, vocab=256):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Attention(dim, heads, kv_heads, batch, capacity, write) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("causal", torch.tril(torch.ones(capacity, capacity, dtype=torch.bool)), persistent=False)

    def forward(self, input_ids, cache_position):
        mask = self.causal[None, None, cache_position]
        x = self.emb(input_ids)
        for layer in self.layers:
            x = x + layer(x, mask, cache_position)
        return self.out(self.norm(x))


class ReadsCacheOddly(GptFast):
    """Like GptFast, but one layer also reads its key cache outside attention (unsupported)."""

    def forward(self, input_ids, cache_position):
        logits = super().forward(input_ids, cache_position)
        return logits + self.layers[0].k_cache.mean()
