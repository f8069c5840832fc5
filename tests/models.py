"""Tiny random-weight models at real head dims, one per registry entry (no downloads)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

TINY_CONFIGS = {
    # Llama 2 head dim 128 with GQA (4 query heads, 2 KV heads)
    "llama": dict(model_type="llama", hidden_size=512, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, head_dim=128),
    "gpt2": dict(model_type="gpt2", n_embd=128, n_head=2, n_layer=2),
    "gpt2-layer-scaled": dict(model_type="gpt2", n_embd=128, n_head=2, n_layer=3,
                              scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "gptj": dict(model_type="gptj", n_embd=512, n_head=2, n_layer=2, rotary_dim=64),
    "gpt_neox-80": dict(model_type="gpt_neox", hidden_size=160, num_attention_heads=2, num_hidden_layers=2,
                        intermediate_size=128, rotary_pct=0.25),
    "gpt_neox-96": dict(model_type="gpt_neox", hidden_size=192, num_attention_heads=2, num_hidden_layers=2,
                        intermediate_size=128, rotary_pct=0.25),
    "qwen2-generic": dict(model_type="qwen2", hidden_size=128, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2, num_hidden_layers=2),
    # Sliding windows of 8 keys, so that test lengths (prompts of 9 to 37 tokens, 20 generated) cross them.
    "mistral": dict(model_type="mistral", hidden_size=128, intermediate_size=128, num_attention_heads=2,
                    num_key_value_heads=1, num_hidden_layers=2, head_dim=64, sliding_window=8),
    "qwen2-sliding": dict(model_type="qwen2", hidden_size=128, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2, num_hidden_layers=2, use_sliding_window=True, sliding_window=8,
                          max_window_layers=1),  # layer 0 full, layer 1 sliding
    "qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, head_dim=32, use_sliding_window=True,
                  sliding_window=8, max_window_layers=1),
    "phi3": dict(model_type="phi3", hidden_size=128, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=2, num_hidden_layers=2, sliding_window=8, pad_token_id=0),
    # Gemma 2: larger weights and softcap 1 (real checkpoints: 50), so that the cap bends these random-weight
    # scores (a few units); the query pre-attention scalar differs from head_dim, as in Gemma 2 27B.
    "gemma2": dict(model_type="gemma2", hidden_size=128, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=2, head_dim=64, query_pre_attn_scalar=24,
                   attn_logit_softcapping=1.0, final_logit_softcapping=30.0, sliding_window=8,
                   initializer_range=0.1),
    "gemma3": dict(model_type="gemma3_text", hidden_size=128, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24,
                   sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=128, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, num_hidden_layers=2, head_dim=32, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=8),
}


def tiny_config(name, **overrides):
    kwargs = dict(TINY_CONFIGS[name])
    model_type = kwargs.pop("model_type")
    kwargs.update(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=0, **overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(name, *, dtype=torch.float32, attn="eager", cls=AutoModelForCausalLM, **overrides):
    torch.manual_seed(torch.seed() % 2**31)  # fresh weights every run
    model = cls.from_config(tiny_config(name, **overrides), attn_implementation=attn, dtype=dtype)
    return model.to(DEVICE).eval()


def token_ids(*shape):
    return torch.randint(2, VOCAB, shape, device=DEVICE)


def byte_tokenizer():
    """A byte-level BPE tokenizer trained here (no downloads): for model folders saved by tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_model_folder(path, model_type: str, **config):
    """A local model folder (random weights, a byte-level tokenizer), as `flashpatch verify PATH` loads it."""
    kwargs = dict(vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=0, **config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)
