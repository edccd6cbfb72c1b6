"""The device sampler's draw in three launches: penalties + temperature, torch.topk, then one program per row that
finds the draw among the top-K candidates (`DeviceSampler` in nanoqwen/sampling.py states the semantics and is the
torch reference: the same integer masses, the same order, the same tokens).

`sampler_scores` (grid: rows x vocabulary blocks): logits in any float dtype -> fp32 scores; the repetition penalty
where the slot's `seen` mask is set, then presence/frequency penalties from its counts, then division by its
temperature. Every operation is one IEEE-rounded fp32 op in the order torch runs them (no fused multiply-add, a
correctly rounded division), so the scores equal the torch path's bit for bit.

`sampler_draw` (one program per row), after `values, ids = scores.topk(K)`:
1. one pass over the row: the total integer mass floor(exp(x - max) * 2^bits) (fp64 exp) of the tokens in the row's
   top-k set, and the first index of the maximum (the argmax of a greedy row);
2. the seeded uniform (the same 32-bit hash as `sampling._uniforms`);
3. a top-p row: the K candidates sorted by (value desc, id desc) with `tl.sort` on an int64 key, their masses and
   running sum, the nucleus and the inverse-CDF position among them. When the nucleus or the position lies past the
   candidates strictly above the K-th value (a flat row: rare for a language model), the exact search of
   `sampling._MassOrder` instead, in the same program: a weighted radix select over the 32-bit order key, 4 bits a
   pass, for the nucleus's last token and then for the drawn position, and one over the ids of a tie group. So no
   row is ever left for `DeviceSampler.complete`, and no step has to wait for its tokens;
4. a sampled row without top-p: a second pass, the inverse-CDF position in vocabulary order;
5. the state: the slot's step counter advances, the token is marked seen / counted.
Integer sums do not depend on order, so the result does not either. fp64 exp may differ by an ulp between two
implementations (numpy in the interpreter, torch on the CPU): a mass then moves by at most a few units in 2^bits,
which changes a draw with probability below 2^-40.
"""
import torch

from . import tl, triton  # Triton, or stand-ins when it is not installed (see __init__)

_MASK32 = 0xFFFFFFFF


@triton.jit
def _scores_kernel(logits_ptr, slots_ptr, seen_ptr, counts_ptr, rep_ptr, pres_ptr, freq_ptr, temp_ptr, out_ptr,
                   V, stride_l, REPETITION: tl.constexpr, COUNTS: tl.constexpr, TEMPERATURE: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    slot = tl.load(slots_ptr + row)
    x = tl.load(logits_ptr + row * stride_l + cols, mask=mask, other=0.0).to(tl.float32)
    if REPETITION:  # HF: positive logits divided by the penalty, negative ones multiplied
        p = tl.load(rep_ptr + slot)
        seen = tl.load(seen_ptr + slot * V + cols, mask=mask, other=0) != 0
        x = tl.where(seen, tl.where(x < 0, x * p, tl.math.div_rn(x, p)), x)
    if COUNTS:  # x - counts * frequency - (counts > 0) * presence, left to right
        c = tl.load(counts_ptr + slot * V + cols, mask=mask, other=0)
        x = x - c.to(tl.float32) * tl.load(freq_ptr + slot)
        x = x - (c > 0).to(tl.float32) * tl.load(pres_ptr + slot)
    if TEMPERATURE:
        x = tl.math.div_rn(x, tl.load(temp_ptr + slot))
    tl.store(out_ptr + row * V + cols, x, mask=mask)


@triton.jit
def _mix32(x):
    """sampling._mix32 on int64 scalars holding [0, 2^32): (x * c) mod 2^32 with c taken as c - 2^32 when >= 2^31."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * (0x846CA68B - 4294967296)) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _order_key(x):
    """sampling._order_key as int64 in [0, 2^32): float32 order, -0.0 equal to +0.0."""
    bits = x.to(tl.int32, bitcast=True)
    negative = bits >> 31
    return ((bits ^ (negative & 0x7FFFFFFF)) - negative).to(tl.int64) + 2147483648


@triton.jit
def _find(scores_ptr, row, V, top, kth, scale, q, BLOCK: tl.constexpr):
    """`sampling._MassOrder.find` for one row in one program: the tie group (its order key) holding mass position q
    in the order (value desc, id desc), the mass before it, q's offset into it and each tied token's mass. A weighted
    radix select over the 32-bit key, 4 bits a pass (8 passes over the row, no sort)."""
    digits = tl.arange(0, 16)
    prefix = tl.zeros([], dtype=tl.int64)
    before = tl.zeros([], dtype=tl.int64)
    group_mass = tl.zeros([], dtype=tl.int64)
    count = tl.zeros([], dtype=tl.int64)
    for level in tl.static_range(8):
        shift = 28 - 4 * level
        hist = tl.zeros([16], dtype=tl.int64)
        tied = tl.zeros([16], dtype=tl.int64)
        for start in range(0, V, BLOCK):
            at_col = start + tl.arange(0, BLOCK).to(tl.int64)
            in_row = at_col < V
            score = tl.load(scores_ptr + row * V + at_col, mask=in_row, other=float("-inf"))
            key = _order_key(score)
            weight = tl.where(in_row & (score >= kth), (tl.exp((score - top).to(tl.float64)) * scale).to(tl.int64), 0)
            hit = (in_row & ((key >> (shift + 4)) == (prefix >> (shift + 4))))[:, None] & \
                (((key >> shift) & 15)[:, None] == digits[None, :])
            hist += tl.sum(tl.where(hit, weight[:, None], 0), 0)
            if level == 7:
                tied += tl.sum(hit.to(tl.int64), 0)
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # the mass of a digit and the digits above it
        d = tl.minimum(tl.maximum(tl.sum((before + at_or_above > q).to(tl.int64), 0) - 1, 0), 15)
        group_mass = tl.sum(tl.where(digits == d, hist, 0), 0)
        before += tl.sum(tl.where(digits == d, at_or_above, 0), 0) - group_mass
        prefix += d << shift
        if level == 7:
            count = tl.sum(tl.where(digits == d, tied, 0), 0)
    return prefix, before, q - before, tl.maximum(group_mass // tl.maximum(count, 1), 1)


@triton.jit
def _tied_token(scores_ptr, row, V, group, rank, BLOCK: tl.constexpr):
    """`sampling._MassOrder.token`: the id of rank `rank` (0 = the highest id) among the tokens whose order key is
    `group`: a radix select over the id, 4 bits a pass, counting tokens."""
    digits = tl.arange(0, 16)
    prefix = tl.zeros([], dtype=tl.int64)
    before = tl.zeros([], dtype=tl.int64)
    for level in tl.static_range(8):
        shift = 28 - 4 * level
        hist = tl.zeros([16], dtype=tl.int64)
        for start in range(0, V, BLOCK):
            at_col = start + tl.arange(0, BLOCK).to(tl.int64)
            in_row = at_col < V
            score = tl.load(scores_ptr + row * V + at_col, mask=in_row, other=float("-inf"))
            hit = (in_row & (_order_key(score) == group) & ((at_col >> (shift + 4)) == (prefix >> (shift + 4))))[:, None] \
                & (((at_col >> shift) & 15)[:, None] == digits[None, :])
            hist += tl.sum(hit.to(tl.int64), 0)
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        d = tl.minimum(tl.maximum(tl.sum((before + at_or_above > rank).to(tl.int64), 0) - 1, 0), 15)
        before += tl.sum(tl.where(digits == d, at_or_above - hist, 0), 0)
        prefix += d << shift
    return prefix


@triton.jit
def _draw_kernel(scores_ptr, values_ptr, ids_ptr, slots_ptr, top_k_ptr, top_p_ptr, greedy_ptr, lanes_ptr,
                 steps_ptr, seen_ptr, counts_ptr, next_ptr, V, K, scale,
                 KP: tl.constexpr, BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr,
                 TOP_K: tl.constexpr,
                 TOP_P: tl.constexpr, ANY_GREEDY: tl.constexpr, REPETITION: tl.constexpr, COUNTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row)
    i = tl.arange(0, KP)
    real = i < K
    values = tl.load(values_ptr + row * K + i, mask=real, other=float("-inf"))  # topk: sorted descending
    top = tl.max(values, 0)
    kth = tl.full([], float("-inf"), tl.float32)
    if TOP_K:
        top_k = tl.load(top_k_ptr + slot)
        kth = tl.where(top_k > 0, tl.max(tl.where(i == top_k - 1, values, float("-inf")), 0), float("-inf"))
    lowest = tl.min(tl.where(real, values, float("inf")), 0)  # the K-th value

    # 1. the row's total mass (top-k applied) and its argmax (first index of the maximum)
    total = tl.zeros([], dtype=tl.int64)
    best = tl.full([], V, dtype=tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = cols < V
        x = tl.load(scores_ptr + row * V + cols, mask=inside, other=float("-inf"))
        mass = (tl.exp((x - top).to(tl.float64)) * scale).to(tl.int64)
        total += tl.sum(tl.where(inside & (x >= kth), mass, 0), 0)
        if ANY_GREEDY:
            best = tl.minimum(best, tl.min(tl.where(inside & (x == top), cols, V), 0))

    step = _mix32((tl.load(steps_ptr + slot) & 0xFFFFFFFF) ^ 0x5BD1E995)  # the seeded uniform
    high = _mix32(tl.load(lanes_ptr + slot * 2) ^ step)
    low = _mix32(tl.load(lanes_ptr + slot * 2 + 1) ^ step)
    u = (high * 2097152 + (low >> 11)).to(tl.float64) * 1.1102230246251565e-16  # 2^-53
    token = tl.zeros([], dtype=tl.int64)
    by_id = tl.full([], 1, dtype=tl.int1)
    greedy = tl.full([], 0, dtype=tl.int1)
    if ANY_GREEDY:
        greedy = tl.load(greedy_ptr + slot) != 0

    # 2. a top-p row: the candidates in the sampling order (value desc, id desc; one int64 key, sorted), the nucleus
    # and the draw among them; when either lies past the sure candidates (a flat row), the exact search instead
    if TOP_P:
        ids = tl.load(ids_ptr + row * K + i, mask=real, other=0)
        bits = values.to(tl.int32, bitcast=True)
        negative = bits >> 31
        key = ((bits ^ (negative & 0x7FFFFFFF)) - negative).to(tl.int64) * 4294967296 + ids
        key = tl.sort(tl.where(real, key, -9223372036854775807 - 1), descending=True)
        ids = key & 0xFFFFFFFF
        x = tl.load(scores_ptr + row * V + ids, mask=real, other=float("-inf"))
        mass = tl.where(real & (x >= kth), (tl.exp((x - top).to(tl.float64)) * scale).to(tl.int64), 0)
        cumulative = tl.cumsum(mass, 0)
        if WHOLE_ROW:
            sure = tl.sum(mass, 0)
        else:
            sure = tl.sum(tl.where(x > lowest, mass, 0), 0)
        fraction = tl.load(top_p_ptr + slot)
        by_id = fraction >= 1.0
        limit = tl.minimum(tl.maximum(tl.math.ceil(fraction * total.to(tl.float64)).to(tl.int64), 1), total)
        at = tl.minimum(tl.sum((real & (cumulative <= limit - 1)).to(tl.int64), 0), K - 1)
        kept = tl.sum(tl.where(i == at, cumulative, 0), 0)
        target = tl.maximum(tl.minimum(tl.math.floor(u * kept.to(tl.float64)).to(tl.int64), kept - 1), 0)
        at = tl.minimum(tl.sum((real & (cumulative <= target)).to(tl.int64), 0), K - 1)
        token = tl.sum(tl.where(i == at, ids, 0), 0)
        if (by_id == 0) & ((limit > sure) | (target >= sure)):
            group, before, within, each = _find(scores_ptr, row, V, top, kth, scale, limit - 1, SEARCH_BLOCK)
            kept = before + (within // each + 1) * each
            target = tl.maximum(tl.minimum(tl.math.floor(u * kept.to(tl.float64)).to(tl.int64), kept - 1), 0)
            group, before, within, each = _find(scores_ptr, row, V, top, kth, scale, target, SEARCH_BLOCK)
            token = _tied_token(scores_ptr, row, V, group, within // each, SEARCH_BLOCK)

    # 3. a row without top-p: the draw in vocabulary order (a second pass, a running sum of the masses)
    if by_id & (greedy == 0):
        target = tl.maximum(tl.minimum(tl.math.floor(u * total.to(tl.float64)).to(tl.int64), total - 1), 0)
        running = tl.zeros([], dtype=tl.int64)
        first = tl.full([], V - 1, dtype=tl.int64)
        for start in range(0, V, BLOCK):  # (names apart from section 2's: Triton keeps a name's type)
            at_col = start + tl.arange(0, BLOCK).to(tl.int64)
            in_row = at_col < V
            score = tl.load(scores_ptr + row * V + at_col, mask=in_row, other=float("-inf"))
            weight = tl.where(in_row & (score >= kth), (tl.exp((score - top).to(tl.float64)) * scale).to(tl.int64), 0)
            through = tl.cumsum(weight, 0) + running
            first = tl.minimum(first, tl.min(tl.where(in_row & (through > target), at_col, V - 1), 0))
            running += tl.sum(weight, 0)
        token = first
    if ANY_GREEDY:
        token = tl.where(greedy, tl.where(best < V, best, 0), token)  # a NaN row (a graph's pad row): some id
    tl.store(next_ptr + row, token)

    # 4. the slot's state (pad rows share a slot: the counter goes up atomically)
    tl.atomic_add(steps_ptr + slot, 1)
    if REPETITION:
        tl.store(seen_ptr + slot * V + token, 1)
    if COUNTS:
        tl.atomic_add(counts_ptr + slot * V + token, 1)


def sampler_scores(sampler, logits: torch.Tensor, slots: torch.Tensor, flags) -> torch.Tensor:
    """[B, V] fp32 scores of `DeviceSampler._scores` for `logits` [B, V] (unit last stride), in one launch."""
    rows, vocab = logits.shape
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    if rows:
        block = 4096
        counts = sampler.counts if flags.counts else sampler.seen  # any tensor when unused
        _scores_kernel[(rows, triton.cdiv(vocab, block))](
            logits, slots, sampler.seen.view(torch.uint8), counts, sampler.repetition, sampler.presence,
            sampler.frequency, sampler.temperature, out, vocab, logits.stride(0), REPETITION=flags.repetition,
            COUNTS=flags.counts, TEMPERATURE=flags.temperature, BLOCK=block, num_warps=8, enable_fp_fusion=False)
    return out


def sampler_draw(sampler, scores: torch.Tensor, slots: torch.Tensor, flags, k: int) -> torch.Tensor:
    """Next ids [B] int64 for fp32 `scores` [B, V] (contiguous), as `DeviceSampler` draws them (with `k`
    candidates; never pending: rows past the candidates take the exact search here), and the state updates of
    `DeviceSampler.sample`."""
    rows, vocab = scores.shape
    if not (flags.top_p or flags.top_k):
        k = 1  # only the row's maximum is needed
    values, ids = scores.topk(k, dim=1)  # sorted descending
    next_ids = torch.empty(rows, dtype=torch.int64, device=scores.device)
    if rows:
        counts = sampler.counts if flags.counts else sampler.steps  # any tensor when unused
        _draw_kernel[(rows,)](
            scores, values, ids, slots, sampler.top_k, sampler.top_p_mass, sampler.greedy.view(torch.uint8),
            sampler.seed_lanes, sampler.steps, sampler.seen.view(torch.uint8), counts, next_ids,
            vocab, k, 2.0 ** sampler.mass_bits, KP=triton.next_power_of_2(k),
            BLOCK=2048, SEARCH_BLOCK=256, WHOLE_ROW=k == vocab, TOP_K=bool(flags.top_k), TOP_P=flags.top_p,
            ANY_GREEDY=flags.any_greedy, REPETITION=flags.repetition, COUNTS=flags.counts, num_warps=8,
            enable_fp_fusion=False)
    return next_ids
