"""The benchmark scripts' own logic that runs without a GPU: a stalling peer is cut off, the
tables say what failed and compute the ratios from the timings, bench_generate.py times its variants
in interleaved rounds, and bench_vit.py runs tiny on a CPU."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_attnres  # noqa: E402
import bench_generate  # noqa: E402
import bench_vit  # noqa: E402


@pytest.fixture()
def no_cuda_sync(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def test_a_stalling_peer_is_cut_off(no_cuda_sync):
    x = torch.randn(3, requires_grad=True)

    def python_loop(x):
        start = time.time()
        while time.time() - start < 10:
            pass
        return x * 2

    def child_process(x):  # a compiler running as a subprocess (ptxas)
        subprocess.run([sys.executable, "-c", "import time; time.sleep(10)"])
        return x * 2

    for stall in (python_loop, child_process):
        start = time.time()
        seconds, error = bench_attnres.first_call("peer", stall, [x], 0.5)
        assert time.time() - start < 3 and 0.4 < seconds < 3
        assert error.startswith("TimeoutExpired") and "ran past 0.5 s" in error
    seconds, error = bench_attnres.first_call("peer", lambda x: x * 2, [x], 0.5)
    assert error is None and x.grad is None  # the probe's gradient is not left behind


def test_tables_name_failures_and_compute_ratios():
    meta = {"torch": "t", "triton": "3", "date": "d", "copy_gbps": 3000.0, "peers": {"liger-kernel": "0"}}
    row_bytes = 16384 * 1024 * 2
    rows = [
        {"N": 9, "D": 1024, "fwd_bytes": 10 * row_bytes, "fwdbwd_bytes": 30 * row_bytes, "copy_gbps": 3000.0,
         "ours_fwd": 0.125, "ours_fwdbwd": 0.5, "liger_fwd": 0.25, "liger_fwdbwd": 0.75,
         "ours_fwdbwd_graph": 0.4, "liger_fwdbwd_graph": 1.0},
        {"N": 33, "D": 4096, "fwd_bytes": 34 * 4 * row_bytes, "fwdbwd_bytes": 102 * 4 * row_bytes,
         "copy_gbps": 3000.0, "ours_fwd": 1.6, "ours_fwdbwd": 5.0, "liger_error": "AcceleratorError: illegal address"},
    ]
    md = bench_attnres.to_markdown(rows, "GPU", meta)
    eager = next(line for line in md.splitlines() if line.startswith("| 9 | 1024 |"))
    assert "0.125 / 0.500" in eager and "0.250 / 0.750" in eager and eager.endswith("| 1.50x |")
    assert "2684 (89%)" in eager  # 10 rows of 32 MiB in 0.125 ms, against 3000 GB/s
    failed = next(line for line in md.splitlines() if line.startswith("| 33 | 4096 |"))
    assert "| x |" in failed
    assert "N=33, D=4096, liger: `AcceleratorError: illegal address`" in md
    graphed = [line for line in md.splitlines() if line.startswith("| 9 | 1024 |")][1]
    assert "| 0.400 | 1.000 |" in graphed and graphed.endswith("| 2.50x |")


def test_vit_bench_smoke_runs_on_the_cpu(capsys):
    assert bench_vit.main(["--smoke", "--variants", "residual", "moda +", "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |") or
            line.startswith("| 3 |")]
    assert len(rows) == 4 and all("| eager |" in r for r in rows) and "| 1.000x |" in rows[0]


def test_vit_bench_ratios_are_per_depth_and_mode():
    rows = [{"layers": 12, "mode": "eager", "variant": "residual", "batch": 256, "params": 5.7e6,
             "ms_per_step": 100.0, "images_per_s": 2560.0, "peak_gib": 10.0},
            {"layers": 12, "mode": "eager", "variant": "moda + FFN KV", "batch": 256, "params": 6.0e6,
             "ms_per_step": 125.0, "images_per_s": 2048.0, "peak_gib": 12.0},
            {"layers": 48, "mode": "eager", "variant": "moda + FFN KV", "batch": 256, "params": 2.4e7,
             "error": "OutOfMemoryError()"}]
    bench_vit.add_ratios(rows)
    md = bench_vit.to_markdown(rows, {"device": "GPU", "torch": "t", "shapes": bench_vit.SHAPES})
    moda = next(line for line in md.splitlines() if line.startswith("| 12 | eager | moda + FFN KV |"))
    assert "| 125.0 | 2,048 | 0.800x | 12.0 |" in moda
    assert "| 48 | eager | moda + FFN KV | 24.00 | 256 | failed: OutOfMemoryError() |" in md


def test_generate_bench_interleaves_its_variants():
    """Each round times every variant once per length, variant after variant; the rates come from
    the medians of the rounds (decode: the extra tokens over the extra time)."""
    # per round: a(1), a(5), b(1), b(5)
    calls, seconds = [], iter([1.0, 2.0, 9.0, 2.0, 1.0, 3.0, 9.0, 3.0, 9.0, 3.0, 5.0, 5.0])
    rows = [{"variant": v, "batch": 2, "prompt": 8, "generate": lambda n, v=v: calls.append((v, n)),
             "times": {1: [], 5: []}} for v in ("a", "b")]
    for _ in range(3):
        bench_generate.time_round(rows, lambda fn: (fn(), next(seconds))[1])
    assert calls == [("a", 1), ("a", 5), ("b", 1), ("b", 5)] * 3
    a, b = (bench_generate.finish(row) for row in rows)
    assert "generate" not in a and "times" not in a
    # a: t(1) rounds 1, 1, 9 -> median 1; t(5) 2, 3, 3 -> 3: 2 rows x 8 / 1 s prefill; 2 x 4 tokens / 2 s decode
    assert a["prefill_tok_s"] == 16 and a["decode_tok_s"] == 4 and a["decode_ms_per_step"] == 500
    # b: t(1) 9, 9, 5 -> 9; t(5) 2, 3, 5 -> 3: decode time negative -> nan, never a wrong number
    assert b["prefill_tok_s"] == 16 / 9 and b["decode_tok_s"] != b["decode_tok_s"]


def test_generate_bench_smoke_run_writes_its_rows(tmp_path, capsys):
    """The whole script on the CPU (tiny preset): every variant of each batch size prepared, timed
    in rounds and written, with the ratios to residual, and a failing variant printed, not fatal."""
    import json

    names = ["residual", "residual (dynamic)", "moda + FFN KV"]
    original = bench_generate.build

    def build(name, *args):
        if name == "moda + FFN KV":
            raise RuntimeError("no room")
        return original(name, *args)

    bench_generate.build = build
    try:
        assert bench_generate.main(["--smoke", "--variants", *names, "--batches", "1", "2", "--reps", "1",
                                    "--out", str(tmp_path)]) == 0
    finally:
        bench_generate.build = original
    assert "moda + FFN KV batch 2 failed: RuntimeError('no room')" in capsys.readouterr().out
    rows = json.loads((tmp_path / "generate_cpu_smoke.json").read_text())["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [(n, b) for b in (1, 2) for n in names[:2]]
    for r in rows:
        assert r["timing"] == "interleaved rounds" and r["prefill_tok_s"] > 0 and not r["compiled"]
        assert "decode_vs_residual" in r  # a noisy CPU may leave decode at nan (no number), never a wrong one
    assert "(rounds)" in (tmp_path / "generate_cpu_smoke.md").read_text()
