"""The serving benchmark's statistics (the client itself runs against a server in test_serve.py)."""
from __future__ import annotations

import numpy as np
import pytest

from eft_fast.bench.serve_load import RequestRecord, percentile, summarize


def test_percentile_matches_numpy(rng):
    values = np.random.default_rng(0).exponential(size=101).tolist()
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([3.0], 99) == 3.0 and np.isnan(percentile([], 50))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_summarize_counts_and_latencies():
    records = [RequestRecord([0.1, 0.2, 0.4], latency_s=0.5, output_tokens=5),   # 3 chunks carried 5 tokens
               RequestRecord([0.3], latency_s=0.3, output_tokens=1),
               RequestRecord(error="HTTP 503")]
    result = summarize(records, num_clients=2, duration_s=2.0)
    assert (result.completed, result.failed, result.total_output_tokens) == (2, 1, 6)
    assert result.output_throughput == 3.0 and result.request_throughput == 1.0
    assert result.ttft_ms["p50"] == pytest.approx(200.0)
    assert result.itl_ms["mean"] == pytest.approx(150.0)          # gaps 0.1 and 0.2 s
    assert result.tpot_ms["mean"] == pytest.approx(100.0)         # (0.5 - 0.1) / 4
    assert result.errors == ["HTTP 503"]
