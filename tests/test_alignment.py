"""alignment.py: the device DP of the monotonic alignment search is the Cython kernel's path exactly (its
boundaries, its -1e9, its tie rule), the original VITS kernel's too, and never reads the device from the host."""

import itertools
import math

import numpy as np
import pytest
import torch
from monotonic_alignment_search import maximum_path

from voicetune.night import alignment
from voicetune.night import objective


KINDS = ["normal", "integers", "zeros", "constant", "sharp"]
# (token counts, frame counts) per item; padded batches, tokens = frames, one token, one frame.
SHAPES = [
    ([1], [1]),
    ([1], [17]),
    ([9], [9]),
    ([1, 1, 1], [1, 5, 2]),
    ([4, 1, 7, 7, 3], [9, 1, 7, 20, 3]),
    ([12, 5, 2], [30, 5, 29]),
    ([6, 6], [6, 13]),
]


def random_shapes(count, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = []
    for _ in range(count):
        batch = int(torch.randint(1, 6, (1,), generator=gen))
        tokens = torch.randint(1, 15, (batch,), generator=gen)
        frames = tokens + torch.randint(0, 25, (batch,), generator=gen)
        shapes.append((tokens.tolist(), frames.tolist()))
    return shapes


ALL_SHAPES = SHAPES + random_shapes(25, seed=1)


def padded_mask(tokens, frames, max_tokens=None, max_frames=None):
    """[B, L, T] mask of items with these token and frame counts, padded to the longest (or given) sizes."""
    tokens, frames = torch.tensor(tokens), torch.tensor(frames)
    max_tokens, max_frames = max_tokens or int(tokens.max()), max_frames or int(frames.max())
    return ((torch.arange(max_tokens)[None, :, None] < tokens[:, None, None])
            & (torch.arange(max_frames)[None, None, :] < frames[:, None, None])).float()


def scores(kind, shape, gen):
    """neg_cent of a kind, padding cells included (the paths must ignore them)."""
    if kind == "normal":
        return torch.randn(shape, generator=gen) * 3
    if kind == "integers":  # many exact ties
        return torch.randint(-2, 1, shape, generator=gen).float()
    if kind == "zeros":  # every path ties
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, -0.75)
    if kind == "sharp":  # sums below -1e9: the kernel's -1e9 at the diagonal beats them
        return -3e8 * torch.rand(shape, generator=gen)
    raise ValueError(kind)


def vits_maximum_path_each(path, value, t_y, t_x, max_neg_val):
    index = t_x - 1
    for y in range(t_y):
        for x in range(max(0, t_x + y - t_y), min(t_x, y + 1)):
            if x == y:
                v_cur = max_neg_val
            else:
                v_cur = value[y - 1, x]
            if x == 0:
                if y == 0:
                    v_prev = np.float32(0.0)
                else:
                    v_prev = max_neg_val
            else:
                v_prev = value[y - 1, x - 1]
            value[y, x] += max(v_prev, v_cur)
    for y in range(t_y - 1, -1, -1):
        path[y, index] = 1
        if index != 0 and (index == y or value[y - 1, index] < value[y - 1, index - 1]):
            index = index - 1


def vits_maximum_path(neg_cent, mask, max_neg_val=-1e9):
    """jaywalnut310/vits monotonic_align (__init__.py's maximum_path, core.pyx's maximum_path_each) written
    out in Python over numpy float32 scalars, as the kernel computes in C floats. VITS's layout is
    [b, frames, tokens] (t_t, t_s); this takes and returns ours, [b, tokens, frames]."""
    value = neg_cent.transpose(1, 2).numpy().astype(np.float32).copy()
    mask = mask.transpose(1, 2)
    path = np.zeros(value.shape, dtype=np.int32)
    t_t_max = mask.sum(1)[:, 0].numpy().astype(np.int32)
    t_s_max = mask.sum(2)[:, 0].numpy().astype(np.int32)
    for i in range(len(value)):
        vits_maximum_path_each(path[i], value[i], int(t_t_max[i]), int(t_s_max[i]), np.float32(max_neg_val))
    return torch.from_numpy(path).transpose(1, 2).float()


@pytest.mark.parametrize("kind", KINDS)
def test_the_device_path_is_the_kernels_and_vits_on_every_shape(kind):
    gen = torch.Generator().manual_seed(KINDS.index(kind))
    for tokens, frames in ALL_SHAPES:
        mask = padded_mask(tokens, frames)
        neg_cent = scores(kind, mask.shape, gen)
        device = alignment.device_maximum_path(neg_cent, mask)
        assert device.dtype == torch.float32 and device.shape == mask.shape
        assert torch.equal(device, maximum_path(neg_cent, mask)), (kind, tokens, frames)
        assert torch.equal(device, vits_maximum_path(neg_cent, mask)), (kind, tokens, frames)


def test_the_sharp_scores_exercise_the_kernels_minus_1e9():
    """Where a score sum passes -1e9, the kernel's -1e9 is not -inf: the paths the tests compare differ."""
    gen = torch.Generator().manual_seed(KINDS.index("sharp"))
    differ = 0
    for tokens, frames in ALL_SHAPES:
        mask = padded_mask(tokens, frames)
        neg_cent = scores("sharp", mask.shape, gen)
        differ += not torch.equal(vits_maximum_path(neg_cent, mask), vits_maximum_path(neg_cent, mask, -np.inf))
    assert differ >= 5


def test_a_tie_keeps_the_path_on_its_token():
    """All scores equal: walking back from the last frame the path stays on the last token until the
    diagonal forces it down, one frame per token before it."""
    mask = padded_mask([4], [10])
    path = alignment.device_maximum_path(torch.zeros(mask.shape), mask)[0]
    assert path.sum(1).tolist() == [1, 1, 1, 7]


def test_non_finite_scores_give_the_kernels_path():
    """A diverging model's NaN/inf: the kernel's max keeps the same token's cell unless the other is
    strictly greater, so a NaN propagates as it does there."""
    gen = torch.Generator().manual_seed(5)
    for tokens, frames in ALL_SHAPES:
        mask = padded_mask(tokens, frames)
        neg_cent = torch.randn(mask.shape, generator=gen)
        odd = torch.rand(mask.shape, generator=gen)
        neg_cent[odd < 0.05] = float("nan")
        neg_cent[(odd >= 0.05) & (odd < 0.08)] = float("-inf")
        neg_cent[(odd >= 0.08) & (odd < 0.1)] = float("inf")
        path = alignment.device_maximum_path(neg_cent, mask)
        assert torch.equal(path, maximum_path(neg_cent, mask)), (tokens, frames)


def lengths(mask):
    return mask.sum(1)[:, 0].long().tolist(), mask.sum(2)[:, 0].long().tolist()


@pytest.mark.parametrize("kind", ["normal", "integers", "zeros", "sharp"])
def test_every_path_is_monotonic_and_covers_each_token_and_frame(kind):
    gen = torch.Generator().manual_seed(10 + KINDS.index(kind))
    for tokens, frames in ALL_SHAPES:
        mask = padded_mask(tokens, frames, max_frames=max(frames) + 3)  # padding frames at every item's end
        path = alignment.device_maximum_path(scores(kind, mask.shape, gen), mask)
        assert torch.equal(path * mask, path)  # nothing in the padding
        for item, (n_tokens, n_frames) in enumerate(zip(*lengths(mask))):
            p = path[item, :n_tokens, :n_frames]
            assert set(p.unique().tolist()) <= {0.0, 1.0}
            assert p.sum(0).tolist() == [1.0] * n_frames  # one token per frame
            assert all(d >= 1 for d in p.sum(1).tolist())  # at least one frame per token
            token_of_frame = p.argmax(0)
            steps = token_of_frame[1:] - token_of_frame[:-1]
            assert token_of_frame[0] == 0 and token_of_frame[-1] == n_tokens - 1
            assert all(s in (0, 1) for s in steps.tolist())  # monotonic, no token skipped


def test_the_device_path_reads_nothing_back_to_the_host():
    """On meta tensors (shapes, no data) any .item(), .cpu(), bool(tensor) or boolean-mask indexing raises:
    the DP runs through, so it only queues work on the scores' device."""
    mask = padded_mask([3, 5], [8, 6]).to("meta")
    path = alignment.device_maximum_path(torch.empty(mask.shape, device="meta"), mask)
    assert path.shape == mask.shape and path.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_device_path_is_the_kernels_without_a_synchronisation():
    gen = torch.Generator().manual_seed(20)
    for kind in KINDS:
        for tokens, frames in ALL_SHAPES:
            mask = padded_mask(tokens, frames)
            neg_cent = scores(kind, mask.shape, gen)
            cuda_mask, cuda_scores = mask.cuda(), neg_cent.cuda()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                path = alignment.device_maximum_path(cuda_scores, cuda_mask)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(path.cpu(), maximum_path(neg_cent, mask)), (kind, tokens, frames)


def alignment_inputs(seed, tokens=(7, 3, 5), frames=(20, 9, 31), channels=4):
    gen = torch.Generator().manual_seed(seed)
    batch, length, time = len(tokens), max(tokens), max(frames)
    x_mask = (torch.arange(length)[None, :] < torch.tensor(tokens)[:, None]).float()[:, None, :]  # [B, 1, L]
    y_mask = (torch.arange(time)[None, :] < torch.tensor(frames)[:, None]).float()[:, None, :]  # [B, 1, T]
    z_p = torch.randn(batch, channels, time, generator=gen) * y_mask
    m_p = torch.randn(batch, channels, length, generator=gen) * x_mask
    logs_p = torch.randn(batch, channels, length, generator=gen) * x_mask - 2  # a sharp prior: large products
    return z_p, m_p, logs_p, x_mask, y_mask


def test_monotonic_alignment_gives_one_path_with_the_device_dp_on_or_off(monkeypatch):
    for seed in range(5):
        inputs = alignment_inputs(seed)
        monkeypatch.setattr(alignment, "DEVICE_MAS", "on")
        on = alignment.monotonic_alignment(*inputs)
        monkeypatch.setattr(alignment, "DEVICE_MAS", "off")
        off = alignment.monotonic_alignment(*inputs)
        assert torch.equal(on, off)
        assert on.shape == (3, inputs[1].size(2), inputs[0].size(2)) and on.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):  # still fp32 inside: the same path
            monkeypatch.setattr(alignment, "DEVICE_MAS", "on")
            assert torch.equal(alignment.monotonic_alignment(*inputs), off)


def test_auto_takes_the_kernel_on_the_cpu_and_a_wrong_setting_is_refused(monkeypatch):
    calls = []

    def kernel(neg_cent, mask):
        calls.append(1)
        return maximum_path(neg_cent, mask)
    monkeypatch.setattr(alignment, "maximum_path", kernel)
    monkeypatch.setattr(alignment, "DEVICE_MAS", "auto")
    alignment.monotonic_alignment(*alignment_inputs(0))
    assert calls == [1]
    assert alignment.use_device_mas(torch.device("cuda")) and not alignment.use_device_mas(torch.device("cpu"))
    monkeypatch.setattr(alignment, "DEVICE_MAS", "yes")
    with pytest.raises(ValueError, match="DEVICE_MAS"):
        alignment.monotonic_alignment(*alignment_inputs(0))


def sharp_prior_case():
    """z_p, m_p, logs_p, masks with a sharp prior (sigma 0.02) whose log-likelihood products pass 65504."""
    gen = torch.Generator().manual_seed(0)
    b, c, tokens, frames = 2, 16, 7, 40
    m_p = 3 * torch.randn(b, c, tokens, generator=gen)
    logs_p = torch.full((b, c, tokens), math.log(0.02))
    z_p = 3 * torch.randn(b, c, frames, generator=gen)
    x_mask = torch.ones(b, 1, tokens)
    y_mask = torch.ones(b, 1, frames)
    x_mask[1, :, 5:] = 0
    y_mask[1, :, 31:] = 0
    return z_p, m_p, logs_p, x_mask, y_mask


def test_the_alignment_and_prior_expansion_under_fp16_autocast_equal_fp32():
    z_p, m_p, logs_p, x_mask, y_mask = sharp_prior_case()
    # The case is one fp16 breaks: its log-likelihood product leaves fp16's range.
    s_p_sq_r = torch.exp(-2 * logs_p)
    assert torch.matmul((m_p * s_p_sq_r).transpose(1, 2), z_p).abs().max() > 65504
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(torch.matmul(s_p_sq_r.transpose(1, 2), -0.5 * z_p.pow(2))).all()
    path32 = objective.monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask)
    with torch.autocast("cpu", dtype=torch.float16):
        path16 = objective.monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask)
        m16, logs16 = objective.expand_prior(m_p, logs_p, path16)
    assert torch.equal(path16, path32)
    assert m16.dtype == torch.float32 and torch.equal(m16, torch.matmul(m_p, path32))
    assert torch.equal(logs16, torch.matmul(logs_p, path32))


def brute_force_path(values, n_tokens, n_frames):
    """Best monotonic path by enumerating where each token after the first starts."""
    best, best_path = -np.inf, None
    for starts in itertools.combinations(range(1, n_frames), n_tokens - 1):
        bounds = (0,) + starts + (n_frames,)
        path = np.zeros((n_tokens, n_frames))
        for token in range(n_tokens):
            path[token, bounds[token]:bounds[token + 1]] = 1
        score = (values[:n_tokens, :n_frames] * path).sum()
        if score > best:
            best, best_path = score, path
    return best_path


def test_alignment_is_the_most_likely_path_and_its_durations_fill_each_clip():
    g = torch.Generator().manual_seed(1)
    lengths = [(3, 7), (5, 9), (1, 5), (4, 4)]  # (tokens, frames), unequal in a padded batch
    tokens, frames = torch.tensor([t for t, _ in lengths]), torch.tensor([f for _, f in lengths])
    z_p, m_p = torch.randn(4, 2, 9, generator=g), torch.randn(4, 2, 5, generator=g)
    logs_p = 0.5 * torch.randn(4, 2, 5, generator=g)
    x_mask = objective.sequence_mask(tokens, 5).unsqueeze(1).float()
    y_mask = objective.sequence_mask(frames, 9).unsqueeze(1).float()
    path = objective.monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask)

    # log N(z_p[:, t] | m_p[:, l], exp(logs_p[:, l])) summed over channels, for every (token l, frame t)
    log_likelihood = torch.distributions.Normal(m_p.unsqueeze(3), logs_p.exp().unsqueeze(3)).log_prob(
        z_p.unsqueeze(2)).sum(1)
    durations = path.sum(2)
    for b, (n_tokens, n_frames) in enumerate(lengths):
        expected = np.zeros((5, 9))
        expected[:n_tokens, :n_frames] = brute_force_path(log_likelihood[b].numpy(), n_tokens, n_frames)
        np.testing.assert_array_equal(path[b].numpy(), expected)
        assert durations[b].sum() == n_frames
        assert torch.all(durations[b, :n_tokens] >= 1) and torch.all(durations[b, n_tokens:] == 0)
