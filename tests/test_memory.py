"""Memory stays bounded by ``chunk_size``: accumulated statistics do not grow with the number of chunks, nor peak memory with N."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lightning_mem as lm
from lightning_mem.functional import jacobian_gram
from lightning_mem.functional.statistics import GramStatistics, gram_statistics


def _decoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 40)).double().eval()


def _layout(statistics: GramStatistics) -> list[tuple[tuple[int, ...], int]]:
    return [(tuple(value.shape), value.nbytes) for value in statistics]


def test_accumulated_statistics_do_not_grow_and_equal_one_batch():
    decoder = _decoder()
    z = torch.randn(320, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    total, layouts = None, []
    for jacobian in lm.iter_decoder_jacobians(decoder, z, chunk_size=16):
        part = gram_statistics(jacobian_gram(jacobian))
        total = part if total is None else GramStatistics(*(a + b for a, b in zip(total, part, strict=True)))
        layouts.append(_layout(total))
    assert len(layouts) == 20
    assert all(layout == layouts[0] for layout in layouts)
    assert sum(nbytes for _, nbytes in layouts[0]) < 1024  # (1 + 6 + 1 + 36 + 6 + 1) float64 values
    single = gram_statistics(jacobian_gram(lm.decoder_jacobian(decoder, z)))  # one batch, no chunks
    assert float(single.count[0]) == 320
    for name, chunked, whole in zip(GramStatistics._fields, total, single, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12, msg=name)


def test_metric_states_do_not_grow_over_many_updates():
    decoder = _decoder()
    z = torch.randn(320, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    metric = lm.ManifoldEntropicMetrics(latent_dim=6)
    sizes = []
    for jacobian in lm.iter_decoder_jacobians(decoder, z, chunk_size=16):
        metric.update(jacobian)
        sizes.append(sorted((name, tuple(state.shape), state.nbytes) for name, state in metric.metric_state.items()))
    assert all(size == sizes[0] for size in sizes)
    values = metric.compute()
    jacobian = lm.decoder_jacobian(decoder, z)
    per_latent, total = lm.functional.manifold_entropy(jacobian)
    torch.testing.assert_close(values["latent_entropy"], per_latent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(values["entropy"], total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        values["pairwise_mutual_information"], lm.functional.manifold_pairwise_mutual_information(jacobian), rtol=1e-12, atol=1e-12
    )


_PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import lightning_mem as lm
    from lightning_mem.functional import jacobian_gram
    from lightning_mem.functional.statistics import gram_statistics
    torch.manual_seed(0)
    n, chunk = int(sys.argv[1]), (None if sys.argv[2] == "none" else int(sys.argv[2]))
    decoder = nn.Sequential(nn.Linear(32, 4096), nn.Tanh()).eval()  # J: 4096 x 32 float32 = 512 KiB a sample
    z = torch.randn(n, 32)
    def high_water_mark():  # VmHWM starts afresh at exec; ru_maxrss would include the forking parent's RSS
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
        except OSError:  # not Linux
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    before = high_water_mark()
    total = 0.0
    for jacobian in lm.iter_decoder_jacobians(decoder, z, chunk_size=chunk):
        total += float(gram_statistics(jacobian_gram(jacobian)).log_det.sum())
    print(high_water_mark() - before)
    """
)


def _peak_growth(n: int, chunk_size: int | None) -> int:
    """Peak resident memory added by evaluating ``n`` samples, in bytes, measured in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(n), "none" if chunk_size is None else str(chunk_size)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_is_set_by_chunk_size_not_by_the_number_of_samples():
    full_jacobian = 1024 * 4096 * 32 * 4  # 512 MiB for N = 1024
    small = _peak_growth(64, 16)
    large = _peak_growth(1024, 16)
    unchunked = _peak_growth(1024, None)
    assert large - small < full_jacobian / 8, (small, large)
    # the measurement can see the difference: without chunks the whole Jacobian is resident at once
    assert unchunked - small > full_jacobian / 2, (small, unchunked)
