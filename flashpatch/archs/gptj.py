"""GPT-J: head dim 256, partial rotary (rotary_dim) applied to q/k before attention, float32 scores in eager.

transformers releases up to at least 5.17 keep GPT-J on its own `GPTJAttention._attn` instead of the
AttentionInterface; there the patch replaces `_attn` on each attention module (the legacy path).
"""

from .base import ArchSpec


def install_legacy(model) -> list:
    """Route each GPTJAttention._attn through flashpatch; returns undo callables."""
    from ..adapter import flashpatch_attention_forward

    undo = []
    for module in model.modules():
        if type(module).__name__ != "GPTJAttention" or not hasattr(module, "_attn"):
            continue

        def remember_output_attentions(mod, args, kwargs):
            mod._flashpatch_output_attentions = bool(kwargs.get("output_attentions"))

        def _attn(query, key, value, attention_mask=None, *unused, _module=module):
            out, _ = flashpatch_attention_forward(
                _module, query, key, value, attention_mask, dropout=_module.attn_dropout.p,
                scaling=1.0 / float(_module.scale_attn),
                output_attentions=getattr(_module, "_flashpatch_output_attentions", False))
            return out.transpose(1, 2), None  # legacy _attn returns [B, H, S, D]

        hook = module.register_forward_pre_hook(remember_output_attentions, with_kwargs=True)
        module._attn = _attn

        def restore(module=module, hook=hook):
            hook.remove()
            del module._attn

        undo.append(restore)
    return undo


SPEC = ArchSpec(
    name="gptj",
    model_types=("gptj",),
    head_dims=(256,),
    scaling=lambda module: module.head_dim ** -0.5,
    legacy_install=install_legacy,
    quirks=(
        "rotary_dim covers only the first dims of each head; GPTJAttention rotates them before the attention call",
        "eager upcasts q and k to float32; the kernels accumulate in float32 as well",
    ),
)
