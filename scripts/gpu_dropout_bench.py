"""GPT-2's training attention (batch 8, 12 heads, 1024 tokens, head dim 64, causal, bf16), with and without
attention dropout: forward+backward ms of flashpatch vs SDPA's flash and efficient backends."""

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashpatch

q, k, v = (torch.randn(8, 12, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
grad = torch.randn_like(q)
backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
print("| dropout | flashpatch ms | sdpa-flash ms | sdpa-efficient ms |\n|---|---|---|---|")
for p in (0.0, 0.1):
    def ours():
        torch.autograd.grad(flashpatch.attention(q, k, v, causal=True, dropout_p=p), (q, k, v), grad)

    cells = [triton.testing.do_bench(ours, warmup=25, rep=200, return_mode="median")]
    for backend in backends.values():
        def theirs(backend=backend):
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
            torch.autograd.grad(out, (q, k, v), grad)
        cells.append(triton.testing.do_bench(theirs, warmup=25, rep=200, return_mode="median"))
    print(f"| {p} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
