"""Reading a model's counters from Triton's own statistics, race-free.

Triton updates a model's statistics when a request is released, which can be just after its
response reached the client (seen on a loaded 2-core machine: a batch of the previous test
counted after the next test's first read). Tests that compare counts before and after their
own traffic read them through `settled_counts`.
"""
from __future__ import annotations

import time

import tritonclient.grpc as triton_grpc


def model_counts(url: str, model: str) -> tuple[int, int]:
    """``(inference_count, execution_count)`` of ``model`` at Triton gRPC ``url``."""
    client = triton_grpc.InferenceServerClient(url)
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def settled_counts(
    url: str, model: str, *, at_least: int = 0, timeout_s: float = 10.0, step_s: float = 0.25
) -> tuple[int, int]:
    """`model_counts` once two reads ``step_s`` apart agree and ``inference_count >= at_least``
    (or whatever was last read after ``timeout_s``; the caller's assertion then reports it)."""
    deadline = time.monotonic() + timeout_s
    previous = model_counts(url, model)
    while True:
        time.sleep(step_s)
        current = model_counts(url, model)
        if (current == previous and current[0] >= at_least) or time.monotonic() > deadline:
            return current
        previous = current


def compute_totals(url: str, model: str) -> tuple[int, float]:
    """``(frames, seconds)``: the inferences ``model`` has computed so far and the time its
    executions took (s), from Triton's per-batch-size statistics (``batch_stats``: per batch
    size ``b``, the executions and their total ``compute_infer`` time). ``seconds / frames``
    is the server's time per frame as this machine runs it now (a loaded CPU is slower)."""
    client = triton_grpc.InferenceServerClient(url)
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    frames = seconds = 0.0
    for batch in stats.get("batch_stats", []):
        compute = batch.get("compute_infer", {})
        frames += int(batch["batch_size"]) * int(compute.get("count", 0))
        seconds += int(compute.get("ns", 0)) / 1e9
    return int(frames), seconds
