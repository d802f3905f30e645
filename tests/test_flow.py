"""pyamalgam._flow: the flow convention (t -> t+k, pixels, x then y) and the backward warp."""
import math

import numpy as np
import pytest
import torch

from pyamalgam._flow import flow_grid, warp


def _reference_warp(x: np.ndarray, flow: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """float64, one pixel at a time: sample x (B, C, H, W) at (u + fx, v + fy) in pixel-index
    coordinates (centre of pixel u at u), clamping to the border, as the docstring states."""
    b, c, h, w = x.shape
    out = np.zeros((b, c, h, w))
    inside = np.zeros((b, h, w), dtype=bool)
    for n in range(b):
        for v in range(h):
            for u in range(w):
                sx, sy = u + flow[n, 0, v, u], v + flow[n, 1, v, u]
                inside[n, v, u] = -0.5 <= sx <= w - 0.5 and -0.5 <= sy <= h - 0.5
                sx, sy = min(max(sx, 0.0), w - 1.0), min(max(sy, 0.0), h - 1.0)
                if mode == "nearest":
                    out[n, :, v, u] = x[n, :, int(np.rint(sy)), int(np.rint(sx))]
                    continue
                x0, y0 = math.floor(sx), math.floor(sy)
                ax, ay = sx - x0, sy - y0
                x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
                out[n, :, v, u] = ((1 - ay) * ((1 - ax) * x[n, :, y0, x0] + ax * x[n, :, y0, x1])
                                   + ay * ((1 - ax) * x[n, :, y1, x0] + ax * x[n, :, y1, x1]))
    return out, inside


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 5, 7), (2, 3, 4, 9), (1, 2, 7, 3)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_matches_a_float64_reference(shape, mode):
    g = torch.Generator().manual_seed(sum(shape))
    b, c, h, w = shape
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    # displacements of up to ~1.5 image sizes, so some land outside; avoid exact .5 ties for nearest
    flow = (torch.rand((b, 2, h, w), generator=g, dtype=torch.float64) - 0.5) * 3 * torch.tensor([w, h]).view(1, 2, 1, 1)
    flow = flow + 0.0123
    got, inside = warp(x, flow, mode=mode)
    ref, ref_inside = _reference_warp(x.numpy(), flow.numpy(), mode)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(inside.numpy(), ref_inside)
    assert got.shape == x.shape and inside.shape == (b, h, w) and inside.dtype == torch.bool


def test_integer_shift_moves_content_in_the_stated_direction():
    # frame t+1 is frame t shifted by 2 columns right and 1 row down: flow t->t+1 = (+2, +1)
    frame_t = torch.arange(6 * 8, dtype=torch.float32).view(1, 1, 6, 8)
    frame_t1 = torch.zeros_like(frame_t)
    frame_t1[..., 1:, 2:] = frame_t[..., :-1, :-2]
    flow = torch.zeros(1, 2, 6, 8)
    flow[:, 0], flow[:, 1] = 2.0, 1.0
    for mode in ("bilinear", "nearest"):
        back, inside = warp(frame_t1, flow, mode=mode)
        assert inside[0, :5, :6].all() and not inside[0, 5:, :].any() and not inside[0, :, 6:].any()
        torch.testing.assert_close(back[0, 0][inside[0]], frame_t[0, 0][inside[0]], rtol=0, atol=0)


def test_labels_and_masks_keep_their_dtype_and_need_nearest():
    seg = torch.randint(0, 300, (2, 5, 6))
    flow = torch.zeros(2, 2, 5, 6)
    flow[:, 0] = -1.0  # frame t+k is shifted one column left
    out, inside = warp(seg, flow, mode="nearest")
    assert out.dtype == torch.int64 and out.shape == seg.shape
    torch.testing.assert_close(out[:, :, 1:], seg[:, :, :-1])
    assert not inside[:, :, 0].any() and inside[:, :, 1:].all()
    mask, _ = warp(seg > 100, flow, mode="nearest")
    assert mask.dtype == torch.bool
    with pytest.raises(ValueError, match="mode='nearest'"):
        warp(seg, flow)


def test_zero_flow_is_the_identity_and_everything_is_in_bounds():
    x = torch.rand(1, 3, 5, 7, dtype=torch.float64)
    out, inside = warp(x, torch.zeros(1, 2, 5, 7, dtype=torch.float64))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-15)
    assert inside.all()


def test_non_finite_flow_is_out_of_bounds_and_gives_finite_values():
    x = torch.rand(1, 1, 3, 4)
    flow = torch.zeros(1, 2, 3, 4)
    flow[0, 0, 1, 2], flow[0, 1, 0, 0], flow[0, 0, 2, 3] = float("nan"), float("inf"), -float("inf")
    out, inside = warp(x, flow)
    assert torch.isfinite(out).all()
    assert inside.sum() == 12 - 3 and not inside[0, 1, 2] and not inside[0, 0, 0]


def test_gradcheck_in_image_and_flow():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    flow = ((torch.rand(1, 2, 4, 5, generator=g, dtype=torch.float64) - 0.5) * 2.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, f: warp(a, f)[0], (x, flow))


def test_flow_grid_is_the_pixel_centre_grid_for_zero_flow():
    grid, inside = flow_grid(torch.zeros(1, 2, 2, 4))
    torch.testing.assert_close(grid[0, 0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(grid[0, :, 0, 1], torch.tensor([-0.5, 0.5]))
    assert inside.all()


@pytest.mark.parametrize("x, flow, kw, err, msg", [
    ("not a tensor", torch.zeros(1, 2, 3, 3), {}, TypeError, "x must be a torch.Tensor"),
    (torch.zeros(1, 1, 3, 3), np.zeros((1, 2, 3, 3)), {}, TypeError, "flow must be a torch.Tensor"),
    (torch.zeros(1, 1, 3, 3), torch.zeros(1, 3, 3, 3), {}, ValueError, r"flow must be \(B, 2, H, W\)"),
    (torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 3, dtype=torch.int64), {}, TypeError, "floating-point"),
    (torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 4), {}, ValueError, "same batch size"),
    (torch.zeros(2, 1, 3, 3), torch.zeros(1, 2, 3, 3), {}, ValueError, "same batch size"),
    (torch.zeros(3, 3), torch.zeros(1, 2, 3, 3), {}, ValueError, "x must be"),
    (torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 3), {"mode": "bicubic"}, ValueError, "mode must be"),
    (torch.zeros(1, 1, 0, 3), torch.zeros(1, 2, 0, 3), {}, ValueError, "must not be empty"),
])
def test_bad_arguments_are_named(x, flow, kw, err, msg):
    with pytest.raises(err, match=msg):
        warp(x, flow, **kw)


# ------------------------------------------------ the convention on a synthetic clip (exact flow)
def _footprint(flow: torch.Tensor, h: int, w: int):
    """The (4, H, W) flat indices of the bilinear taps that warp() reads in frame t+1."""
    u = torch.arange(w, dtype=torch.float64).view(1, w) + flow[0].double()
    v = torch.arange(h, dtype=torch.float64).view(h, 1) + flow[1].double()
    u, v = u.clamp(0, w - 1), v.clamp(0, h - 1)
    x0, y0 = u.floor().long(), v.floor().long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    return torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1])


def _uniform(values: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """(H, W): all four taps of ``values`` (C, H, W) hold the same value."""
    flat = values.reshape(values.shape[0], -1)
    got = flat[:, taps]  # (C, 4, H, W)
    return (got == got[:, :1]).all(dim=1).all(dim=0)


@pytest.fixture(scope="module")
def clip_pair():
    from pyamalgam.data import SyntheticClips
    ds = SyntheticClips("train", size=3, frames=2, resolution=(40, 56), seed=1)
    return ds, ds[2], ds.scenes(2)


def test_warping_frame_t1_with_the_exact_flow_reproduces_frame_t(clip_pair):
    ds, clip, (scene_t, scene_t1) = clip_pair
    h, w = ds.resolution
    flow, valid = clip["flow"][0], clip["flow_valid"][0]
    assert flow.abs().max() > 0.5 and valid.float().mean() > 0.8  # it moves, mostly visible
    taps = _footprint(flow, h, w)
    # segmentation: exactly where the bilinear footprint lies on one label (not on an edge)
    seg_w, inside = warp(clip["seg"][1:], clip["flow"], mode="nearest")
    assert inside[0][valid].all()
    interior = valid & _uniform(clip["seg"][1:], taps)
    assert interior.float().sum() > 0.85 * valid.float().sum()
    torch.testing.assert_close(seg_w[0][interior], clip["seg"][0][interior], rtol=0, atol=0)
    # depth: frame t+1 holds the depth of X in camera t+1, which we compute here independently
    k = ds.intrinsics.numpy()
    mask_t = clip["mask"][0].numpy()
    from pyamalgam.data.synthetic.motion import back_project, project
    x = back_project(scene_t, clip["depth"][0].numpy(), k)
    uv, z1 = project(scene_t1, x, k)
    planar = valid & clip["mask"][0] & _uniform(clip["mask"][1:].float(), taps) & _uniform(clip["normal"][1], taps)
    # and not in the outer half pixel, where border padding reads the edge pixel unblended
    su = torch.arange(w).view(1, w) + flow[0]
    sv = torch.arange(h).view(h, 1) + flow[1]
    planar &= (su >= 0) & (su <= w - 1) & (sv >= 0) & (sv <= h - 1)
    assert planar.float().mean() > 0.5
    depth_w, _ = warp(clip["depth"][1:].unsqueeze(1).double(), clip["flow"].double())
    np.testing.assert_allclose(depth_w[0, 0].numpy()[planar.numpy()], z1.reshape(h, w)[planar.numpy()], rtol=2e-3)
    # and the flow itself is that projection (float32 depth: ~1e-4 px)
    us, vs = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    ref = np.stack([uv[0].reshape(h, w) - us, uv[1].reshape(h, w) - vs])
    np.testing.assert_allclose(flow.numpy()[:, mask_t], ref[:, mask_t], atol=2e-3)
    # normals: frame t+1's normals, rotated into camera t, are frame t's (on planar footprints)
    normal_w, _ = warp(clip["normal"][1:].double(), clip["flow"].double())
    rel = scene_t.camera_rotation.T @ scene_t1.camera_rotation
    n_t = np.einsum("ij,jhw->ihw", rel, normal_w[0].numpy())
    np.testing.assert_allclose(n_t[:, planar.numpy()], clip["normal"][0].numpy()[:, planar.numpy()], atol=1e-4)
    # image (Lambertian, static light): equal up to sensor noise and texture interpolation
    image_w, _ = warp(clip["image"][1:], clip["flow"])
    err = (image_w[0] - clip["image"][0]).abs().mean(0)[interior]
    assert err.mean() < 0.06


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 7, 9, generator=g)
    flow = (torch.rand(2, 2, 7, 9, generator=g) - 0.5) * 6
    for mode in ("bilinear", "nearest"):
        cpu, cpu_in = warp(x, flow, mode=mode)
        gpu, gpu_in = warp(x.cuda(), flow.cuda(), mode=mode)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
        assert torch.equal(gpu_in.cpu(), cpu_in)


def test_compiles_with_fullgraph():
    # the temporal losses call warp inside compiled training steps
    x, flow = torch.rand(1, 2, 5, 7), torch.randn(1, 2, 5, 7)
    compiled = torch.compile(lambda a, f: warp(a, f), fullgraph=True)
    out, inside = compiled(x, flow)
    ref, ref_inside = warp(x, flow)
    torch.testing.assert_close(out, ref)
    assert torch.equal(inside, ref_inside)
