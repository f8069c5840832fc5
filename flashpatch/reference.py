"""Plain-PyTorch attention with flashpatch's exact semantics: the yardstick for tests.

Materialises the [Sq, Sk] score matrix, so it is for checking, not for speed.
"""

import torch


def visibility_mask(seq_q: int, seq_k: int, *, causal: bool, key_padding_mask: torch.Tensor | None,
                    device: torch.device, seqused_k: torch.Tensor | None = None,
                    segment_ids: torch.Tensor | None = None, window=None) -> torch.Tensor | None:
    """Bool [B or 1, 1, Sq, Sk]: True where query i may attend key j (bottom-right causal, aligned to
    seqused_k[b] instead of Sk when given; keys at or past seqused_k[b] are invisible; with segment_ids [B, S],
    only keys of the query's own segment; with window (left, right), flash-attn's sliding window: only keys
    i + offset - left <= j <= i + offset + right, offset the same alignment, -1 leaving a side unbounded, causal
    making right 0)."""
    mask = None
    rows = torch.arange(seq_q, device=device)[:, None]
    cols = torch.arange(seq_k, device=device)[None, :]
    offset = seq_k - seq_q
    if seqused_k is not None:
        used = seqused_k.to(device)[:, None, None, None]
        offset = used - seq_q
        mask = cols < used
        if causal:
            mask = mask & (cols <= rows + offset)
    elif causal:
        mask = (cols <= rows + offset)[None, None]
    if window is not None:
        left, right = window
        band = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
        if left >= 0:
            band = band & (cols >= rows + offset - left)
        if right >= 0 and not causal:
            band = band & (cols <= rows + offset + right)
        band = band if band.dim() == 4 else band[None, None]
        mask = band if mask is None else mask & band
    if segment_ids is not None:
        same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None].to(device)
        mask = same if mask is None else mask & same
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return mask


def reference_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, compute_dtype=None,
                        seqused_k=None, segment_ids=None, window=None, softcap=None, sinks=None):
    """Attention in `compute_dtype` (default: the input dtype); rows that see no key give zeros. softcap: scores
    become softcap * tanh(scores / softcap), after the scale (Gemma 2's order). sinks [Hq]: one more logit per
    query head in every row's softmax, with no value (gpt-oss' `s_aux`); differentiable like q, k, v."""
    compute_dtype = compute_dtype or q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    kc = kc.repeat_interleave(group, dim=1)
    vc = vc.repeat_interleave(group, dim=1)
    scores = (qc @ kc.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    mask = visibility_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask,
                           device=q.device, seqused_k=seqused_k, segment_ids=segment_ids, window=window)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(compute_dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
        logits = torch.cat([scores, sink], dim=-1)  # a row's sink is always seen
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        probs = probs.masked_fill(logits.isneginf().all(-1, keepdim=True), 0.0)  # a sink of -inf and no key
        return (probs @ vc).to(q.dtype)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # softmax of all -inf is NaN
    return (probs @ vc).to(q.dtype)
