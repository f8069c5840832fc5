"""cProfile of flashpatch.attention for a 512-token causal prefill (Llama-2-7B head shape) on a GPU: where its host time goes."""
import cProfile, pstats, time, torch, flashpatch
q, k, v = (torch.randn(1, 32, 512, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
f = lambda: flashpatch.attention(q, k, v, causal=True)
with torch.no_grad():
    for _ in range(50): f()
    torch.cuda.synchronize()
    for n in (200,):
        t = time.perf_counter()
        for _ in range(n): f()
        host = (time.perf_counter() - t) / n * 1e6
        torch.cuda.synchronize()
        print(f"host us per prefill call (no sync): {host:.1f}")
    p = cProfile.Profile(); p.enable()
    for _ in range(500): f()
    p.disable(); torch.cuda.synchronize()
    pstats.Stats(p).sort_stats("tottime").print_stats(22)
