"""Can a Triton loop overlap the softmax with the next block's QKᵀ on Hopper without warp specialisation? (issue 8)

Compiles, for an sm90 target without a GPU, a plain attention loop and a hand-pipelined one that issues block j+1's
QKᵀ before block j's softmax (FA3's intra-warpgroup overlap), and counts wgmma instructions and their waits in the
PTX. Triton 3.9 places `wgmma.wait_group 0` right after the early QKᵀ in both, so nothing overlaps: the schedule is
the compiler's, not the kernel's. Usage: python3 scripts/pipelined_loop_sm90.py
"""

import triton
import triton.language as tl
from compiled_code_sm90 import census
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _pipe(Q, K, V, O, qk_scale, stride_m, stride_n, seq_k,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PIPE: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * seq_k * D + offs_m[:, None] * stride_m + offs_d[None, :])
    kb = K + bh * seq_k * D
    vb = V + bh * seq_k * D
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if PIPE:
        k = tl.load(kb + offs_n[None, :] * stride_n + offs_d[:, None])
        qk = tl.dot(q, k)
        for start in range(BLOCK_N, seq_k, BLOCK_N):
            k = tl.load(kb + (start + offs_n)[None, :] * stride_n + offs_d[:, None])
            qk_next = tl.dot(q, k)
            s = qk * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vb + (start - BLOCK_N + offs_n)[:, None] * stride_n + offs_d[None, :])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
            qk = qk_next
        s = qk * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vb + (seq_k - BLOCK_N + offs_n)[:, None] * stride_n + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    else:
        for start in range(0, seq_k, BLOCK_N):
            k = tl.load(kb + (start + offs_n)[None, :] * stride_n + offs_d[:, None])
            s = tl.dot(q, k) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vb + (start + offs_n)[:, None] * stride_n + offs_d[None, :])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + bh * seq_k * D + offs_m[:, None] * stride_m + offs_d[None, :], out.to(O.dtype.element_ty))


POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16"}
names = _pipe.arg_names
print(f"triton {triton.__version__}, target sm90, bf16 (a tile over 227 KB would not launch; it compiles)")
for pipe in (False, True):
    for block_m, block_n, warps, stages, head_dim in [(128, 64, 8, 3, 128), (128, 128, 8, 3, 128), (128, 64, 8, 3, 64)]:
        constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, D=head_dim, PIPE=pipe)
        signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "fp32" if n == "qk_scale" else "i32")
                     for n in names}
        aligned = [n for n in names if n in POINTERS or n.startswith("stride")]
        source = ASTSource(_pipe, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                           attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
        print("hand-pipelined" if pipe else "plain", f"{block_m}x{block_n} d{head_dim}",
              f"shared {compiled.metadata.shared} B", census(compiled.asm["ptx"]))
