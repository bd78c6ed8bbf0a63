"""The fused assignment kernel's logic on CPU, through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter must be on before Triton is first imported, so the kernel runs in one child
process for all cases; the tests check its answers against a float64 reference here. Skipped
where Triton is not installed.
"""

import importlib.util
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter runs on CPU)"
)

CHILD = """
import sys, torch
import pcl_scale.core.kmeans_triton as kt
out = {}
for name, (precision, x, c) in torch.load(sys.argv[1]).items():
    kt.PRECISION = precision
    # "split" cases: launches of at most ~3 tiles, as 2^31 elements would split a huge x
    kt.MAX_LAUNCH_ELEMENTS = 3 * 64 * x.shape[1] if name.startswith("split") else 2**31 - 1
    try:
        out[name] = kt.nearest_centroid(x, c)
    except Exception as e:  # reported per case, so one failing case fails only its test
        out[name] = repr(e)
torch.save(out, sys.argv[2])
"""


def clustered(n, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(k // 4, 2), d, generator=g), dim=1)
    x = centres[torch.randint(len(centres), (n,), generator=g)]
    x = F.normalize(x + 0.3 * torch.randn(n, d, generator=g), dim=1)
    return x, x[torch.randperm(n, generator=g)[:k]].clone()


# sizes that are not multiples of the tiles and a D that is not a power of two: masked loads
# D below 16 (model.dim = 8 or 3) runs on a tile padded to 16, the smallest tl.dot takes
SIZES = [(2_000, 300, 128), (1_029, 131, 96), (300, 67, 16), (400, 37, 8), (200, 21, 3)]
SCALES = [20, -30]  # powers of two: 2^20 overflows float16 unless rescaled, 2^-30 flushes to 0


def cases():
    out = {}
    for n, k, d in SIZES:
        x, c = clustered(n, k, d, seed=n)
        for precision in ("fp16", "tf32"):
            out[f"{precision}-{n}-{k}-{d}"] = (precision, x, c)
    x, c = clustered(1_000, 200, 64, seed=3)
    for exponent in [0, *SCALES]:
        out[f"scaled{exponent}"] = ("fp16", x * 2.0**exponent, c * 2.0**exponent)
    out["unknown"] = ("fp8", x, c)
    for precision in ("fp16", "tf32"):  # the same points in one launch and in many
        x, c = clustered(2_000, 150, 96, seed=9)
        out[f"whole-{precision}"] = out[f"split-{precision}"] = (precision, x, c)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interpreted")
    inputs = cases()
    torch.save(inputs, tmp / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp / "in.pt"), str(tmp / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return inputs, torch.load(tmp / "out.pt")


def exact_sq_distances(x, c):  # (n, k) in float64, the slow reference
    xd, cd = x.double(), c.double()
    return xd.pow(2).sum(1, keepdim=True) - 2 * xd @ cd.T + cd.pow(2).sum(1)


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
@pytest.mark.parametrize("n, k, d", SIZES)
def test_pick_is_the_nearest_centroid_up_to_rounding(run, precision, n, k, d):
    inputs, outputs = run
    name = f"{precision}-{n}-{k}-{d}"
    _, x, c = inputs[name]
    a, dist = outputs[name]
    assert a.dtype == torch.int64 and a.shape == (n,) and int(a.min()) >= 0 and int(a.max()) < k
    ref = exact_sq_distances(x, c)
    picked = ref.gather(1, a[:, None]).squeeze(1)
    # the returned distance is the exact one of the pick
    assert torch.allclose(dist.double(), picked, atol=1e-5)
    # products rounded to a 10-bit mantissa may flip a near-tie, by no more than that rounding
    assert float((picked - ref.min(1).values).max()) < 2e-3
    assert float((a == ref.argmin(1)).float().mean()) > 0.99


def test_fp16_picks_do_not_move_under_a_power_of_two_scale(run):
    inputs, outputs = run
    _, x, c = inputs["scaled0"]
    base, _ = outputs["scaled0"]
    assert float((base == exact_sq_distances(x, c).argmin(1)).float().mean()) > 0.99
    for exponent in SCALES:
        a, dist = outputs[f"scaled{exponent}"]
        assert torch.equal(a, base), exponent  # the rescale is exact
        s = 2.0**exponent
        assert torch.allclose(dist / s**2, (x - c[base]).pow(2).sum(1), atol=1e-5)


def test_unknown_precision_is_refused(run):
    _, outputs = run
    assert "fp8" in outputs["unknown"] and "fp16" in outputs["unknown"]


def test_tile_width_is_at_least_16():
    from pcl_scale.core.kmeans_triton import padded_dim

    assert [padded_dim(d) for d in (1, 3, 8, 16, 17, 96, 128)] == [16, 16, 16, 16, 32, 128, 128]


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
def test_split_launches_give_the_same_picks(run, precision):
    """Launches over row ranges (as below 2^31 elements each) equal one launch over all rows."""
    _, outputs = run
    whole, split = outputs[f"whole-{precision}"], outputs[f"split-{precision}"]
    assert torch.equal(whole[0], split[0]) and torch.equal(whole[1], split[1])


def test_launch_ranges_cover_every_row_below_the_int32_limit():
    from pcl_scale.core.kmeans_triton import MAX_LAUNCH_ELEMENTS, launch_ranges

    n, d, block = 20_000_000, 128, 256  # 2.56e9 elements: over 2^31
    ranges = launch_ranges(n, d, block)
    assert len(ranges) == 2 and ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all((stop - start + block) * d <= MAX_LAUNCH_ELEMENTS for start, stop in ranges)
    assert all((stop - start) % block == 0 for start, stop in ranges[:-1])
    assert launch_ranges(1000, 128, 256) == [(0, 1000)]
