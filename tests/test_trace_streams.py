"""benchmarks/trace_streams.py on a hand-made trace: a sampler stream whose kernels double in length while another
stream is busy, and keep their gaps, reads as device contention (2x the same kernels), not host waits."""

import gzip
import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("trace_streams",
                                              Path(__file__).resolve().parents[1] / "benchmarks/trace_streams.py")
ts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ts)


def test_kernels_beside_a_busy_stream_are_told_from_those_alone(tmp_path, capsys, monkeypatch):
    events, t = [], 0.0
    for i in range(400):  # stream 20: 10 us kernels 5 us apart, 20 us while stream 7 is busy (1,000-3,000 us)
        d = 20.0 if 1000 <= t <= 3000 else 10.0
        events.append({"cat": "kernel", "ph": "X", "name": f"k{i % 3}", "ts": t, "dur": d, "args": {"stream": 20}})
        t += d + 5
    events += [{"cat": "kernel", "ph": "X", "name": "gemm", "ts": 1000 + 100 * j, "dur": 90, "args": {"stream": 7}}
               for j in range(20)]
    events.append({"cat": "cpu_op", "ph": "X", "name": "aten::mm", "ts": 0, "dur": 5})  # not a kernel: left out
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    ks = ts.kernels(str(path))
    assert len(ks) == 420 and ks == sorted(ks, key=lambda k: k[1])
    spans = ts.windows([k for k in ks if k[0] == 7], 200.0)
    assert spans == [(1000.0, 2990.0)] and ts.inside(1500.0, spans) and not ts.inside(3500.0, spans)
    monkeypatch.setattr("sys.argv", ["trace_streams.py", str(path)])
    ts.main()
    out = capsys.readouterr().out
    assert "sampler: stream 20; beside stream 7" in out
    assert "the same kernels beside / alone: 2.00x mean duration" in out
    assert "median gap 5.0 us" in out.split("beside:")[1].split("\n")[0]
