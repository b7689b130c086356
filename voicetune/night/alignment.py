"""Monotonic alignment search (MAS) of VITS: the most likely monotonic path of frames onto tokens.

Two implementations of one result. The Cython kernel (`monotonic_alignment_search.maximum_path`, the
VITS / glow-tts core.pyx) copies the scores to the CPU: on a GPU that is a host-device synchronisation in
every step, and the CPU's DP then holds the GPU idle. `device_maximum_path` runs the same dynamic
programme as tensor ops on the scores' own device, with no host read, so the step's kernels keep queueing.
"""

import math

import torch
from monotonic_alignment_search import maximum_path

# "auto": the device DP where the tensors are on CUDA, the Cython kernel on the CPU (no device to keep busy
# there); "on" / "off" force one, so benchmarks/bench_train.py --levers --host_syncs can switch it.
DEVICE_MAS = "auto"

# The kernel's stand-in for an unreachable cell. Not -inf: a score sum below -1e9 (a sharp prior over a long
# clip) loses to it at the path's edges, and the device DP must pick exactly what the kernel picks.
MAX_NEG_VAL = -1e9


def monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask):
    """Most likely monotonic path of frames onto tokens: [B, tokens, frames] of 0/1, no gradient.

    Always fp32, autocast off: under autocast torch.matmul of fp32 tensors returns fp16, and with a sharp
    prior the log-likelihood products pass fp16's 65504, so the path would go silently wrong.
    """
    with torch.no_grad(), torch.autocast(z_p.device.type, enabled=False):
        z_p, m_p, logs_p = z_p.float(), m_p.float(), logs_p.float()
        s_p_sq_r = torch.exp(-2 * logs_p)  # [B, C, L]
        # log N(z_p | m_p, s_p) for every (token, frame), expanded as in VITS to four matmuls
        neg_cent1 = torch.sum(-0.5 * math.log(2 * math.pi) - logs_p, [1]).unsqueeze(2)  # [B, L, 1]
        neg_cent2 = torch.matmul(s_p_sq_r.transpose(1, 2), -0.5 * z_p.pow(2))  # [B, L, T]
        neg_cent3 = torch.matmul((m_p * s_p_sq_r).transpose(1, 2), z_p)
        neg_cent4 = torch.sum(-0.5 * m_p.pow(2) * s_p_sq_r, [1]).unsqueeze(2)
        neg_cent = neg_cent1 + neg_cent2 + neg_cent3 + neg_cent4
        mask = x_mask.transpose(1, 2) * y_mask  # [B, L, T]
        search = device_maximum_path if use_device_mas(neg_cent.device) else maximum_path
        return search(neg_cent, mask.float()).to(z_p.dtype)


def use_device_mas(device):
    if DEVICE_MAS not in ("auto", "on", "off"):
        raise ValueError(f"alignment.DEVICE_MAS must be 'auto', 'on' or 'off', not {DEVICE_MAS!r}")
    return DEVICE_MAS == "on" or (DEVICE_MAS == "auto" and device.type == "cuda")


def device_maximum_path(neg_cent, mask):
    """`monotonic_alignment_search.maximum_path(neg_cent, mask)`, bit for bit, on neg_cent's device.

    neg_cent, mask: [B, tokens, frames]; each item's token and frame counts are read from its mask as the
    kernel reads them (its first frame's column, its first token's row). Items need at least as many frames
    as tokens (the kernel's precondition too). Returns the path, 0/1 in the dtype of neg_cent * mask.

    The kernel walks one item's cells one by one; here every item and token of a frame is one tensor op,
    frame after frame (no host read anywhere, so the loop only queues kernels):
    forward  value[x, y] += max(value[x, y-1], value[x-1, y-1]) in fp32; the kernel's max keeps its first
             argument, value[x, y-1] (the same token), unless the other is strictly greater;
    backward from the last token at the last frame, step to the previous token where the frame's token
             index equals the frame's (no room left to stay) or value[x, y-1] < value[x-1, y-1]: on a tie
             the path stays on its token.
    The kernel's boundaries: MAX_NEG_VAL for a cell above the diagonal (x == y) and left of token 0, 0
    before the first cell. Here the cells above the diagonal hold exactly MAX_NEG_VAL (their scores are
    zeroed, so max(MAX_NEG_VAL, MAX_NEG_VAL) + 0 keeps them there) and a column left of token 0 holds it.
    The kernel's cells outside each item's band are never read by the band, so what they hold here differs
    and matters nowhere.
    """
    value = (neg_cent * mask).float()  # the kernel's input, as maximum_path makes it
    out_dtype = torch.result_type(neg_cent, mask)
    batch, tokens, frames = value.shape
    device = value.device
    t_x = mask.sum(1)[:, 0].long()  # [B] tokens
    t_y = mask.sum(2)[:, 0].long()  # [B] frames
    token = torch.arange(tokens, device=device)
    frame = torch.arange(frames, device=device)

    above = token[None, :] > frame[:, None]  # [T, L]
    scores = torch.where(above[:, None, :], 0.0, value.permute(2, 0, 1)).contiguous()  # [T, B, L]
    # Two columns of the DP, each with a column for token -1 in front: cur = col[:, 1:], prev = col[:, :-1].
    col = torch.full((batch, tokens + 1), MAX_NEG_VAL, device=device)
    nxt = torch.full((batch, tokens + 1), MAX_NEG_VAL, device=device)
    col[:, 0] = 0.0  # frame 0: the path starts at (0, 0) from 0
    smaller = torch.empty((frames, batch, tokens), dtype=torch.bool, device=device)  # cur < prev, per frame
    for y in range(frames):
        cur, prev = col[:, 1:], col[:, :-1]
        torch.lt(cur, prev, out=smaller[y])
        torch.where(smaller[y], prev, cur, out=nxt[:, 1:])
        nxt[:, 1:].add_(scores[y])
        if y == 0:
            col[:, 0] = MAX_NEG_VAL
        col, nxt = nxt, col

    # step[y, b, x]: the backtrack at frame y of item b, on token x, moves to token x - 1.
    active = frame[:, None] < t_y[None, :]  # [T, B]: frames the item has
    step = (smaller | (token[None, :] == frame[:, None])[:, None, :]) & (token != 0) & active[:, :, None]
    step = step.to(torch.uint8)
    index = torch.empty((frames, batch), dtype=torch.long, device=device)  # the path's token at each frame
    index[frames - 1] = (t_x - 1).clamp(min=0)  # no token: an empty item has an empty path, never index -1
    for y in range(frames - 1, 0, -1):
        moved = step[y].gather(1, index[y, :, None])[:, 0]
        torch.sub(index[y], moved, out=index[y - 1])
    path = torch.zeros((batch, tokens, frames), dtype=out_dtype, device=device)
    return path.scatter_(1, index.t()[:, None, :], active.t()[:, None, :].to(out_dtype))
