"""``GET /metrics``: the engine's state in the Prometheus text format (version 0.0.4)."""
from __future__ import annotations

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def render_metrics(stats: dict, model_name: str) -> str:
    """Prometheus text for :meth:`AsyncEFTEngine.stats` (every series labelled with the served
    model name; the KV usage also with the model role).

    Series: eft_fast:num_requests_running / _waiting (gauges), eft_fast:kv_cache_usage_perc
    (gauge, the fraction 0..1 of each model's KV blocks in use), eft_fast:num_preemptions_total,
    eft_fast:prompt_tokens_total, eft_fast:generation_tokens_total,
    eft_fast:request_success_total (counters) and, with speculative decoding,
    eft_fast:spec_decode_acceptance_rate (gauge) and the proposed / accepted draft token counters.
    """
    base = {"model_name": model_name}
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP eft_fast:{name} {help_text}")
        lines.append(f"# TYPE eft_fast:{name} {kind}")
        for labels, value in samples:
            lines.append(f"eft_fast:{name}{_labels({**base, **labels})} {float(value)!r}")

    metric("num_requests_running", "gauge", "Requests in the running batch.", [({}, stats["num_requests_running"])])
    metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", [({}, stats["num_requests_waiting"])])
    used, total = stats["kv_blocks_used"], stats["kv_blocks_total"]
    metric("kv_cache_usage_perc", "gauge", "Fraction of the model's KV cache blocks in use (0..1).",
           [({"model": role}, used[role] / total[role] if total[role] else 0.0) for role in used])
    metric("num_preemptions_total", "counter", "Requests preempted (KV pool full) since start.",
           [({}, stats["num_preemptions"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [({}, stats["prompt_tokens_total"])])
    metric("generation_tokens_total", "counter", "Generated tokens.", [({}, stats["generation_tokens_total"])])
    metric("request_success_total", "counter", "Finished requests.", [({}, stats["requests_finished_total"])])
    if "proposed_tokens" in stats:
        rate = stats["acceptance_rate"]
        metric("spec_decode_acceptance_rate", "gauge", "Accepted / proposed draft tokens since start.",
               [({}, rate if rate is not None else 0.0)])
        metric("spec_decode_num_draft_tokens_total", "counter", "Proposed draft tokens.",
               [({}, stats["proposed_tokens"])])
        metric("spec_decode_num_accepted_tokens_total", "counter", "Accepted draft tokens.",
               [({}, stats["accepted_tokens"])])
    return "\n".join(lines) + "\n"
