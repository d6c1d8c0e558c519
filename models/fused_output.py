"""The N-wide output layer h @ Wᵀ + b without its B × N logits: logsumexp
for training (``linear_logsumexp``) and top-k for ranking (``linear_topk``).

The multinomial likelihood of the cluster VAE only needs, per user, the
log-sum-exp of the decoder's last layer over a cluster's items (the
interacted items' logits are summed apart, through an ``embedding_bag``).
Materialised, those B × N_c logits cost about ten memory passes per step
and, at a million items, most of the step time. Here the items are taken in
chunks small enough to stay in cache, and each chunk costs one matmul, one
exp and one reduction: the bias and the per-row shift ride inside the
matmul as two extra columns, [h, -shift, 1] @ [W, 1, b]ᵀ = logits - shift,
so no pass copies the bias in, finds a max or subtracts it. Forward keeps
the running logsumexp as the shift (online logsumexp); backward recomputes
each chunk's logits with lse - log(upstream gradient) as the shift, which
yields softmax · grad directly. Memory is O(B · chunk).
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 19   # logits per chunk (2 MiB in fp32): stays in a CPU core's cache
LOG_ZERO = -1e4            # log of a zero upstream gradient: exp() of it is exactly 0
CANDIDATE_BLOCK = 64       # top-k: columns per block whose max is checked before its scores


def chunk_size(batch: int, n_out: int) -> int:
    return max(1, min(n_out, CHUNK_ELEMENTS // max(batch, 1)))


def _with_shift_columns(h: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """([h, -shift, 1], [W, 1, b]): their product is h @ Wᵀ + b - shift."""
    h_aug = torch.cat([h, -shift[:, None], h.new_ones(h.shape[0], 1)], 1)
    weight_aug = torch.cat([weight, weight.new_ones(weight.shape[0], 1), bias[:, None]], 1)
    return h_aug, weight_aug


def _exact_logsumexp(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Online logsumexp with each chunk's own max: the fallback for rows whose
    logits jump more than exp's range above the running value."""
    B, N = h.shape[0], weight.shape[0]
    step = chunk_size(B, N)
    running_max = torch.full((B,), float("-inf"), device=h.device, dtype=h.dtype)
    running_sum = torch.zeros(B, device=h.device, dtype=h.dtype)
    for lo in range(0, N, step):
        logits = torch.addmm(bias[lo:lo + step], h, weight[lo:lo + step].t())
        new_max = torch.maximum(running_max, logits.amax(1))
        running_sum = running_sum * torch.exp(running_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(1)
        running_max = new_max
    return running_max + torch.log(running_sum)


class LinearLogSumExp(torch.autograd.Function):
    """(B, k), (N, k), (N,) -> (B,): logsumexp over N of h @ weightᵀ + bias."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, N = h.shape[0], weight.shape[0]
        step = chunk_size(B, N)
        lse = _exact_logsumexp(h, weight[:step], bias[:step])   # the first chunk sets the shift
        if step < N:
            h_aug, weight_aug = _with_shift_columns(h, lse, weight, bias)
        for lo in range(step, N, step):
            # Σ exp(logit - lse) over the chunk; lse grows by log(1 + that)
            lse = lse + torch.log1p(torch.mm(h_aug, weight_aug[lo:lo + step].t()).exp_().sum(1))
            h_aug[:, -2] = -lse
        overflowed = ~torch.isfinite(lse)        # one check per call (a sync on GPUs), not per chunk
        if bool(overflowed.any()):
            rows = torch.nonzero(overflowed).flatten()
            lse[rows] = _exact_logsumexp(h[rows], weight, bias)
        ctx.save_for_backward(h, weight, bias, lse)
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        h, weight, bias, lse = ctx.saved_tensors
        B, N = h.shape[0], weight.shape[0]
        step = chunk_size(B, N)
        need_h, need_w, need_b = ctx.needs_input_grad
        # d lse / d logit = softmax; with g >= 0, softmax · g = exp(logit - (lse - log g))
        scale_in_shift = bool((grad_lse >= 0).all())
        shift = lse - torch.log(grad_lse).clamp_min(LOG_ZERO) if scale_in_shift else lse
        h_aug, weight_aug = _with_shift_columns(h, shift, weight, bias)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        for lo in range(0, N, step):
            hi = min(N, lo + step)
            p = torch.mm(h_aug, weight_aug[lo:hi].t()).exp_()
            if not scale_in_shift:
                p.mul_(grad_lse[:, None])
            if need_h:
                grad_h.addmm_(p, weight[lo:hi])
            if need_w:
                torch.mm(p.t(), h, out=grad_w[lo:hi])
            if need_b:
                torch.sum(p, 0, out=grad_b[lo:hi])
        return grad_h, grad_w, grad_b


def linear_logsumexp(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Differentiable logsumexp(h @ weightᵀ + bias, dim=1) in O(B · chunk) memory."""
    return LinearLogSumExp.apply(h, weight, bias)



class RunningTopK:
    """The top-``k`` of each row over score chunks fed one at a time (global item
    ids per column), ranked by (-score, id) like ``models.metrics.topk``.

    Keeps, per row, the k-th best score so far as a threshold: a chunk costs one
    comparison pass, and only the few scores at or above the threshold are
    kept, until the kept pool is compacted back to k per row. Cheaper per score
    than ``torch.topk`` on chunks, which sorts."""

    def __init__(self, batch: int, k: int, device):
        self.batch, self.k, self.device = batch, k, device
        self.threshold = torch.full((batch,), float("-inf"), device=device)
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []   # (rows, values, ids)
        self.size = 0

    def add(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        scores, ids = scores.to(self.device), ids.to(self.device)   # clusters may sit on other devices
        if not self.parts:      # first chunk: its own top-k sets the threshold
            values, cols = torch.topk(scores, min(self.k, scores.shape[1]), dim=1)
            rows = torch.arange(self.batch, device=self.device).repeat_interleave(values.shape[1])
            self._keep(rows, values.reshape(-1), ids[cols.reshape(-1)])
            self._compact()
            return
        # >= threshold (nextafter) keeps ties with the k-th, which the compaction orders by id
        floor = torch.nextafter(self.threshold, self.threshold.new_tensor(float("-inf")))
        found = _sparse_above(scores, floor)
        if found is None:
            found = torch.nonzero(scores > floor[:, None], as_tuple=True)
        rows, cols = found
        if rows.numel():
            self._keep(rows, scores[rows, cols], ids[cols])
        if self.size > 8 * self.batch * self.k:
            self._compact()

    def _keep(self, rows, values, ids) -> None:
        self.parts.append((rows, values, ids))
        self.size += rows.numel()

    def _compact(self) -> None:
        if not self.parts:
            self._keep(*(torch.zeros(0, dtype=t, device=self.device) for t in (torch.long, torch.float, torch.long)))
        rows, values, ids = (torch.cat(t) for t in zip(*self.parts))
        order = torch.argsort(ids, stable=True)                                  # (row, -score, id)
        order = order[torch.argsort(values[order], descending=True, stable=True)]
        order = order[torch.argsort(rows[order], stable=True)]
        rows, values, ids = rows[order], values[order], ids[order]
        starts = torch.searchsorted(rows, torch.arange(self.batch, device=self.device))
        rank = torch.arange(rows.numel(), device=self.device) - starts[rows]
        keep = rank < self.k
        rows, values, ids, rank = rows[keep], values[keep], ids[keep], rank[keep]
        full = torch.bincount(rows, minlength=self.batch) >= self.k
        kth = torch.full((self.batch,), float("-inf"), device=self.device)
        last = rank == self.k - 1
        kth[rows[last]] = values[last]
        self.threshold = torch.where(full, kth, self.threshold.new_tensor(float("-inf")))
        self.parts, self.size = [(rows, values, ids)], rows.numel()
        self._rank = rank

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, ids), each (B, k), best first; missing or -inf slots have id -1."""
        self._compact()
        rows, values, ids = self.parts[0]
        out_values = torch.full((self.batch, self.k), float("-inf"), device=self.device)
        out_ids = torch.full((self.batch, self.k), -1, dtype=torch.long, device=self.device)
        out_values[rows, self._rank] = values
        out_ids[rows, self._rank] = ids
        out_ids = torch.where(torch.isneginf(out_values), torch.full_like(out_ids, -1), out_ids)
        return out_values, out_ids


def _sparse_above(scores: torch.Tensor, floor: torch.Tensor):
    """(rows, cols) of the scores above their row's ``floor`` when few are, else None.

    Once the running threshold is tight, few scores pass it, and a mask plus
    nonzero over the whole chunk would be most of the ranking's time. A block
    of CANDIDATE_BLOCK columns whose max is not above the floor holds no
    candidate, so one max pass finds the blocks worth searching and only
    those are compared. None when over a quarter of the blocks qualify (or
    the chunk is not whole blocks): the caller takes the plain mask."""
    B, C = scores.shape
    width = CANDIDATE_BLOCK
    if C % width or C < 2 * width or not scores.is_contiguous():
        return None
    blocks = scores.view(B, C // width, width)
    block_rows, block_ids = torch.nonzero(blocks.amax(2) > floor[:, None], as_tuple=True)
    if 4 * block_rows.numel() > B * (C // width):
        return None
    hits, within = torch.nonzero(blocks[block_rows, block_ids] > floor[block_rows, None], as_tuple=True)
    return block_rows[hits], block_ids[hits] * width + within


def linear_topk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ids: torch.Tensor,
                running: RunningTopK, mask_rows: torch.Tensor | None = None,
                mask_cols: torch.Tensor | None = None) -> None:
    """Feed h @ weightᵀ + bias, with the (row, column) pairs of the mask at -inf,
    to ``running`` chunk by chunk; ``ids`` are the columns' global item ids.

    Each chunk's logits are made, masked and reduced while in cache; the full
    (B, N) matrix would cost a page-faulting allocation and a memory pass per
    batch at large N."""
    B, N = h.shape[0], weight.shape[0]
    step = chunk_size(B, N)
    if step > CANDIDATE_BLOCK:                    # whole blocks for _sparse_above's filter
        step -= step % CANDIDATE_BLOCK
    bounds = None
    if mask_rows is not None and mask_rows.numel():
        order = torch.argsort(mask_cols)
        mask_rows, mask_cols = mask_rows[order], mask_cols[order]
        bounds = torch.searchsorted(mask_cols, torch.arange(0, N + step, step, device=mask_cols.device)).tolist()
    for j, lo in enumerate(range(0, N, step)):
        hi = min(N, lo + step)
        logits = torch.addmm(bias[lo:hi], h, weight[lo:hi].t())
        if bounds is not None and bounds[j + 1] > bounds[j]:
            a, b = bounds[j], bounds[j + 1]
            logits[mask_rows[a:b], mask_cols[a:b] - lo] = float("-inf")
        running.add(logits, ids[lo:hi])
