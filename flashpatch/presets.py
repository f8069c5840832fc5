"""Random-weight models built from real architectures' configs: no downloads.

`layers` keeps fewer blocks; `scale` shrinks width for CPU tests while keeping head dims (and GQA where the head
counts allow); keyword overrides replace any config value.
"""

from __future__ import annotations

from dataclasses import dataclass

# Real configs (hidden size, heads, layers, ...) of the checkpoints named.
PRESET_CONFIGS: dict[str, tuple[str, dict]] = {
    # Not a real checkpoint: a 2-layer Llama for CPU runs (head dim 64, GQA 4/2).
    "tiny-llama": ("llama", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                 num_key_value_heads=2, num_hidden_layers=2, vocab_size=512,
                                 max_position_embeddings=2048)),
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000,
                                max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "gpt2": ("gpt2", dict(n_embd=768, n_head=12, n_layer=12, vocab_size=50257, n_positions=1024)),
    "gptj-6b": ("gptj", dict(n_embd=4096, n_head=16, n_layer=28, rotary_dim=64, vocab_size=50400,
                             n_positions=2048)),
    "pythia-1.4b": ("gpt_neox", dict(hidden_size=2048, num_attention_heads=16, num_hidden_layers=24,
                                     intermediate_size=8192, rotary_pct=0.25, vocab_size=50304,
                                     max_position_embeddings=2048, use_parallel_residual=True)),
    "neox-20b": ("gpt_neox", dict(hidden_size=6144, num_attention_heads=64, num_hidden_layers=44,
                                  intermediate_size=24576, rotary_pct=0.25, vocab_size=50432,
                                  max_position_embeddings=2048, use_parallel_residual=True)),
    # meta-llama/Meta-Llama-3-8B (rope_scaling null; Llama 3.1 adds the llama3 rope scaling and 131072 positions)
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
                                max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                                tie_word_embeddings=False)),
    # mistralai/Mistral-7B-v0.3: sliding_window null, every layer attends in full (v0.1 had a 4096 window)
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, num_hidden_layers=32, vocab_size=32768,
                                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                                   sliding_window=None, tie_word_embeddings=False)),
    # Qwen/Qwen2.5-7B, the base model (q/k/v biases come with the qwen2 type): use_sliding_window false, so
    # every layer attends in full
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                 num_key_value_heads=4, num_hidden_layers=28, vocab_size=152064,
                                 max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                 use_sliding_window=False, sliding_window=None, max_window_layers=28,
                                 tie_word_embeddings=False)),
    # mistralai/Mistral-7B-v0.1: every layer slides a 4096-token window
    "mistral-7b-v0.1": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                        num_key_value_heads=8, num_hidden_layers=32, vocab_size=32000,
                                        max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5,
                                        sliding_window=4096, tie_word_embeddings=False)),
    # google/gemma-2-9b: head dim 256, scores softcapped at 50, local (4096 window) and global layers alternating,
    # queries scaled by 256 ** -0.5 (query_pre_attn_scalar); transformers runs it eager (sdpa has no softcap)
    "gemma2-9b": ("gemma2", dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=256, num_hidden_layers=42, vocab_size=256000,
                                 max_position_embeddings=8192, rms_norm_eps=1e-6, attn_logit_softcapping=50.0,
                                 final_logit_softcapping=30.0, query_pre_attn_scalar=256, sliding_window=4096)),
    # openai/gpt-oss-20b: 64/8 heads of 64, a sink logit per head, 128-token windows on every other layer,
    # 32 experts (4 per token)
    "gpt-oss-20b": ("gpt_oss", dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                                    num_key_value_heads=8, head_dim=64, num_hidden_layers=24, num_local_experts=32,
                                    num_experts_per_tok=4, vocab_size=201088, sliding_window=128,
                                    max_position_embeddings=131072, rms_norm_eps=1e-5, attention_bias=True,
                                    tie_word_embeddings=False)),
}

# Config keys of width: (hidden, intermediate or None, query heads, KV heads or None).
_WIDTH_KEYS = {
    "gpt2": ("n_embd", None, "n_head", None),
    "gptj": ("n_embd", None, "n_head", None),
    "gpt_neox": ("hidden_size", "intermediate_size", "num_attention_heads", None),
}
_DEFAULT_WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass
class Preset:
    name: str
    model_type: str
    kwargs: dict

    def config(self, *, layers: int | None = None, max_positions: int | None = None, scale: int | None = None,
               **overrides):
        """The config, with `layers` blocks, `max_positions` positions, width divided by `scale` (query and KV
        heads divided alike, so head dim and the GQA group stay where the counts allow; at least one head of
        each), then `overrides`."""
        from transformers import AutoConfig

        kwargs = dict(self.kwargs)
        if scale is not None and scale > 1:
            kwargs.update(self._scaled_width(kwargs, scale))
        if layers is not None:
            key = "n_layer" if self.model_type in ("gpt2", "gptj") else "num_hidden_layers"
            kwargs[key] = layers
        if max_positions is not None:
            key = "n_positions" if self.model_type in ("gpt2", "gptj") else "max_position_embeddings"
            kwargs[key] = max_positions
        kwargs.update(overrides)
        return AutoConfig.for_model(self.model_type, **kwargs)

    def _scaled_width(self, kwargs: dict, scale: int) -> dict:
        hidden_key, inter_key, heads_key, kv_key = _WIDTH_KEYS.get(self.model_type, _DEFAULT_WIDTH_KEYS)
        heads = kwargs[heads_key]
        head_dim = kwargs.get("head_dim") or kwargs[hidden_key] // heads
        new_heads = max(1, heads // scale)
        scaled = {heads_key: new_heads, hidden_key: new_heads * head_dim}
        if "head_dim" in kwargs or self.model_type not in _WIDTH_KEYS:
            scaled["head_dim"] = head_dim
        if kv_key and kwargs.get(kv_key):
            scaled[kv_key] = max(1, kwargs[kv_key] // scale)
            while new_heads % scaled[kv_key]:
                scaled[kv_key] -= 1
        if inter_key and kwargs.get(inter_key):
            scaled[inter_key] = max(8, kwargs[inter_key] // scale)
        return scaled


def preset(name: str) -> Preset:
    if name not in PRESET_CONFIGS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESET_CONFIGS)}")
    model_type, kwargs = PRESET_CONFIGS[name]
    return Preset(name, model_type, kwargs)


def build_model(name: str, *, layers: int | None = None, dtype=None, device=None, attn_implementation="sdpa",
                seed: int = 0, max_positions: int | None = None, scale: int | None = None, **overrides):
    """A causal LM with random weights from a preset's real config."""
    import torch
    from transformers import AutoModelForCausalLM

    config = preset(name).config(layers=layers, max_positions=max_positions, scale=scale, **overrides)
    torch.manual_seed(seed)
    # Allocate and initialise on the target device: a 20B model initialised on the CPU takes minutes.
    with torch.device(device or "cpu"):
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                     dtype=dtype or torch.float32)
        except ValueError:  # e.g. GPT-J before transformers moved it to the AttentionInterface: no sdpa
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                     dtype=dtype or torch.float32)
    return model.eval()
