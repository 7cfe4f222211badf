"""bench/scaling.py's trace summary: GPU time per step by kernel and category, stream rows only."""

import gzip
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("scaling_bench", ROOT / "bench" / "scaling.py")
scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scaling)


def _trace(tmp_path, events):
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(tmp_path)


def test_summary_counts_stream_rows_of_the_first_gpu(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 8, "args": {"name": "/device:GPU:1"}},
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "Stream #13"}},
            {"ph": "M", "name": "thread_name", "pid": 7, "tid": 2, "args": {"name": "XLA Ops"}}]
    kernels = [("nvjet_hsh_gemm", 3000), ("gla_fwd", 1000), ("_dkv_kernel", 500),
               ("ncclDevKernel_AllReduce", 400), ("loop_multiply_fusion", 100)]
    events, ts = list(meta), 0
    for _ in range(2):
        for name, dur in kernels:
            events.append({"ph": "X", "pid": 7, "tid": 1, "name": name, "ts": ts, "dur": dur})
            ts += dur
        events.append({"ph": "X", "pid": 7, "tid": 2, "name": "fusion.1", "ts": 0, "dur": 99999})
        events.append({"ph": "X", "pid": 8, "tid": 1, "name": "gla_fwd", "ts": 0, "dur": 12345})
    out = scaling.summarize_trace(_trace(tmp_path, events), steps=2)
    assert out["device"] == "/device:GPU:0"
    assert out["kernels_per_step"] == 5
    assert out["busy_ms_per_step"] == 5.0                      # the XLA Ops row is not counted
    assert out["categories_ms_per_step"] == {
        "matmul": 3.0, "gla kernels": 1.0, "attention kernels": 0.5, "communication": 0.4,
        "other (fusions, copies)": 0.1}
    assert out["top_kernels_ms_per_step"][0] == ["nvjet_hsh_gemm", 3.0]
    run = {"name": "single", "step_ms": 6.0, "profile": out}
    table = scaling.profile_table([run])
    assert "| single | 6.0 | 5.0 | 5 | 3.0 | 1.0 | 0.5 | 0.4 | 0.1 |" in table


def test_summary_without_gpu_events_says_so(tmp_path):
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 1, "tid": 1, "name": "ynn_fusion", "ts": 0, "dur": 10}]
    out = scaling.summarize_trace(_trace(tmp_path, events), steps=1)
    assert "error" in out and scaling.profile_table([{"name": "x", "profile": out}]) == ""
