"""GPT-J: head dim 256, partial rotary (rotary_dim) applied to q/k before attention, float32 scores in eager."""

from .base import ArchSpec, head_dim_of, head_dim_problem


def _unsupported(config) -> list[str]:
    return head_dim_problem(head_dim_of(config))


SPEC = ArchSpec(
    name="gptj",
    model_types=("gptj",),
    head_dims=(256,),
    attention_classes=("GPTJAttention",),
    unsupported=_unsupported,
    scaling=lambda module: module.head_dim ** -0.5,
    quirks=(
        "rotary_dim covers only the first dims of each head; GPTJAttention rotates them before the attention call",
        "eager upcasts q and k to float32; the kernels accumulate in float32 as well",
    ),
)
