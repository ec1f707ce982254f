"""Attention Residuals read: our fused kernels against every implementation a user could pick,
all measured in one run on one GPU.

    python benchmarks/bench_attnres.py            # writes benchmarks/results/attnres_<gpu>.{json,md}
    python benchmarks/bench_attnres.py --tune     # also sweeps our kernels' tiles per shape

Shapes: N sources in {9, 17, 33}, D in {1024, 4096}, B*T = 16384 (B=4, T=4096), bf16, one
pseudo-query with a key-norm weight. Candidates (ms, median of triton.testing.do_bench over 3
interleaved rounds), forward and forward+backward (gradients of sources, query, norm weight):
- ours: ``flash_depth.attention_residual`` (Triton);
- reference / compiled: the plain PyTorch formula, eager and under ``torch.compile``;
- liger: ``liger_kernel.ops.attn_res.LigerAttnResFunction``;
- flash_attn_res: ``flash_attn_res.phase_1_batched_attention_triton_op`` (no norm weight: the
  query passed is ``w * g``, the same logits);
- fla: ``fla.ops.attnres.fused_attnres`` (if the installed fla-core has it).
Peers that are not installed (or not named in ``--peers``) are skipped; peers that fail at a
shape are recorded as errors.
Each peer's first forward+backward at a shape (where it compiles and autotunes) runs under an
alarm of ``--peer-timeout`` seconds; one that runs past it is recorded as timed out, with the time
it was given, and left out of that shape, so one stalling peer cannot stop the run. Past 2^31
source elements (N=33, D=4096) that first call runs in a child process: a peer whose 32-bit
offsets overflow faults, and the fault would end this process. The seconds each
first call took are kept in the results (``<peer>_first_call_s``).
Forward+backward is also timed replayed from a CUDA graph (``do_bench_cudagraph``): the GPU time
alone, without any candidate's host overhead.
GB/s counts the bytes the op must move: forward reads N sources and writes the output,
(N + 1) rows of D per token; forward+backward adds reading the sources, the output and its
gradient and writing the source gradients, (3N + 3) rows in all. The copy bandwidth is
measured in the same run (``dst.copy_(src)`` of 2 GiB).
"""

from __future__ import annotations

import argparse
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
from common import bench, bench_interleaved, copy_bandwidth, device_slug, fwd_bwd, save_results

from flash_depth import attention_residual
from flash_depth.ops import attnres_triton

SHAPES = [(9, 1024), (9, 4096), (17, 1024), (17, 4096), (33, 1024), (33, 4096)]
B, T = 4, 4096
EPS = 1e-6
# Static shapes: a compile per shape, but dynamic=True measured a 4x slower backward (5.7 vs
# 1.4 ms at N=9, D=1024), which would be unfair to torch.compile.
COMPILE_DYNAMIC = False


def formula(V, w, g):
    """The plain read on stacked sources ``[N, B, T, D]`` (what torch.compile gets)."""
    vf = V.float()
    logits = (vf @ (w * g).float()) * torch.rsqrt(vf.pow(2).mean(-1) + EPS)
    alpha = torch.softmax(logits, dim=0)
    return (alpha[..., None] * vf).sum(0).to(V.dtype)


PEER_NAMES = ("liger", "flash_attn_res", "fla")


def peers() -> dict:
    """name -> forward(V, w, g) for the peer implementations installed here."""
    found = {}
    try:
        from liger_kernel.ops.attn_res import LigerAttnResFunction

        found["liger"] = lambda V, w, g: LigerAttnResFunction.apply(V, w, g, EPS)
    except ImportError as err:
        print(f"liger-kernel not available: {err}")
    try:
        from flash_attn_res import phase_1_batched_attention_triton_op

        found["flash_attn_res"] = lambda V, w, g: phase_1_batched_attention_triton_op(V, (w * g)[None], EPS)[0][0]
    except ImportError as err:
        print(f"flash-attn-res not available: {err}")
    try:
        from fla.ops.attnres import fused_attnres

        found["fla"] = lambda V, w, g: fused_attnres(w, list(V.unbind(0)), g, rms_eps=EPS)
    except ImportError as err:
        print(f"fla-core fused_attnres not available: {err}")
    return found


def peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("liger-kernel", "flash-attn-res", "fla-core"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def tune(N: int, D: int) -> dict:
    """Best (BLOCK_M, num_warps) of our forward and backward kernels at one shape."""
    M = B * T
    V = torch.randn(N, M, D, device="cuda", dtype=torch.bfloat16)
    w, g = torch.randn(1, D, device="cuda"), torch.rand(1, D, device="cuda") + 0.5
    out, lse, u = attnres_triton.attnres_forward(V, w, g, None, EPS)
    do = torch.randn_like(out)
    best = {}
    for kind in ("fwd", "bwd"):
        results = []
        for block_m in (1, 2, 4, 8, 16, 32):
            if block_m * triton.next_power_of_2(D) > 16384:
                continue
            for warps in (2, 4, 8, 16):
                if kind == "fwd":
                    fn = lambda: attnres_triton.attnres_forward(V, w, g, None, EPS, tiles=(block_m, warps))  # noqa: E731
                else:
                    fn = lambda: attnres_triton.attnres_backward(do, V, w, g, None, out, lse, u, EPS,  # noqa: E731
                                                                 tiles=(block_m, warps))
                try:
                    results.append((bench(fn, rep_ms=30), block_m, warps))
                except Exception as err:  # a tile that does not fit: skip it
                    print(f"  {kind} BLOCK_M={block_m} warps={warps}: {type(err).__name__}")
        results.sort()
        default = attnres_triton._tiles(D, backward=kind == "bwd")
        print(f"N={N} D={D} {kind}: best " + ", ".join(f"({m},{w})={t:.3f}" for t, m, w in results[:4])
              + f"; default tiles {default[0]},{default[2]}", flush=True)
        best[kind] = results[0]
    return best


def inputs(N: int, D: int):
    """Sources ``[N, B, T, D]`` bf16, query and norm weight ``[D]`` float32, all requiring grad."""
    V = torch.randn(N, B, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(D, device="cuda") * 0.05).requires_grad_()
    g = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_()
    return V, w, g


class PeerTimeout(Exception):
    pass


def _raise_peer_timeout(signum, frame):
    raise PeerTimeout


def _timed_out(timeout_s: float) -> str:
    return f"TimeoutExpired: its first forward+backward (compile, autotune) ran past {timeout_s:g} s"


def _first_step(fn, args) -> None:
    """A peer's first forward+backward, where it compiles and autotunes."""
    fn(*args).float().sum().backward()
    torch.cuda.synchronize()


def first_call(name: str, fn, args, timeout_s: float) -> tuple[float, str | None]:
    """(seconds, error or None) of a peer's first forward+backward, cut off after timeout_s by SIGALRM.
    The alarm interrupts Python between the peer's compile and autotune steps (and its ptxas child)."""
    t0 = time.time()
    previous = signal.signal(signal.SIGALRM, _raise_peer_timeout)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        _first_step(fn, args)
        error = None
    except PeerTimeout:
        error = _timed_out(timeout_s)
    except Exception:  # a peer that cannot run this shape: the main run records the real error
        error = None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    for t in args:
        t.grad = None
    seconds = time.time() - t0
    print(f"  {name}: first call {seconds:.1f} s" + (" (timed out)" if error else ""), flush=True)
    return seconds, error


def first_call_in_child(name: str, N: int, D: int, timeout_s: float) -> tuple[float, str | None]:
    """Like :func:`first_call`, in a child process (``--probe``): a peer whose 32-bit offsets
    overflow faults with an illegal address, which would leave this process's CUDA context unusable."""
    t0 = time.time()
    try:
        done = subprocess.run([sys.executable, __file__, "--probe", name, str(N), str(D)], capture_output=True,
                              text=True, timeout=timeout_s)
        lines = [x for x in done.stderr.splitlines() if "Error:" in x or "error:" in x]
        error = None if done.returncode == 0 else (lines[-1] if lines else f"exit code {done.returncode}")[:200]
    except subprocess.TimeoutExpired:
        error = _timed_out(timeout_s)
    seconds = time.time() - t0
    print(f"  {name}: first call in a child process {seconds:.1f} s" + (f" ({error})" if error else ""), flush=True)
    return seconds, error


def peers_within(peer_fns: dict, N: int, D: int, timeout_s: float) -> tuple[dict, dict]:
    """(peers whose first call at this shape finishes within timeout_s, name -> error or first-call seconds).
    Past 2^31 source elements the first call runs in a child process (see :func:`first_call_in_child`),
    which makes its own inputs."""
    kept, notes = {}, {}
    in_child = N * B * T * D >= 2**31
    args = None if in_child else inputs(N, D)
    for name, fn in peer_fns.items():
        seconds, error = (first_call_in_child(name, N, D, timeout_s) if in_child
                          else first_call(name, fn, args, timeout_s))
        notes[f"{name}_first_call_s"] = seconds
        if error:
            notes[f"{name}_error"] = error
        else:
            kept[name] = fn
    del args
    torch.cuda.synchronize()
    return kept, notes


def run_shape(N: int, D: int, peer_fns: dict) -> dict:
    M = B * T
    V, w, g = inputs(N, D)
    compiled = torch.compile(formula, dynamic=COMPILE_DYNAMIC)
    candidates = {
        "ours": lambda: attention_residual(V, w, g, eps=EPS, backend="triton"),
        "reference": lambda: attention_residual(V, w, g, eps=EPS, backend="reference"),
        "compiled": lambda: compiled(V, w, g),
        **{name: (lambda fn=fn: fn(V, w, g)) for name, fn in peer_fns.items()},
    }
    row = {"N": N, "D": D, "B": B, "T": T}
    with torch.no_grad():
        ref = formula(V, w, g).float()
    fwd, step = {}, {}
    for name, fn in candidates.items():
        try:
            with torch.no_grad():
                out = fn().float()
            err = ((out - ref).norm() / ref.norm()).item()
            row[f"{name}_rel_err"] = err
            fwd[name] = lambda fn=fn: fn()
            step[name] = fwd_bwd(fn, [V, w, g])
            step[name]()
        except Exception as exc:  # a peer that cannot run this shape
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            fwd.pop(name, None)
            step.pop(name, None)
        torch.cuda.synchronize()
    with torch.no_grad():
        row.update({f"{k}_fwd": v for k, v in bench_interleaved(fwd, rounds=3).items()})
    row.update({f"{k}_fwdbwd": v for k, v in bench_interleaved(step, rounds=3).items()})
    for name, fn in step.items():  # GPU time alone: the step replayed from a CUDA graph, no host in it
        if name != "reference":
            try:
                row[f"{name}_fwdbwd_graph"] = triton.testing.do_bench_cudagraph(fn, rep=100)
            except Exception as exc:  # a peer whose step cannot be captured
                row[f"{name}_graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                torch.cuda.synchronize()
    row_bytes = M * D * 2
    row["fwd_bytes"], row["fwdbwd_bytes"] = (N + 1) * row_bytes, (3 * N + 3) * row_bytes
    return row


def _missing(r: dict, name: str) -> str:
    """The cell of a candidate without a timing: ``x`` failed (or could not be captured), ``-`` not run."""
    return "x" if f"{name}_error" in r or f"{name}_graph_error" in r else "-"


def _ratio(r: dict, peer: str, timing: str) -> str:
    """Peer time / our time for ``timing`` ("fwdbwd" or "fwdbwd_graph")."""
    return f"{r[f'{peer}_{timing}'] / r[f'ours_{timing}']:.2f}x" if f"{peer}_{timing}" in r else _missing(r, peer)


def _gbps(r: dict, kind: str, copy_gbps: float, suffix: str = "") -> str:
    """Our GB/s for ``kind`` ("fwd" or "fwdbwd"; ``suffix`` "_graph" for the CUDA-graph timing) and its % of copy."""
    gbps = r[f"{kind}_bytes"] / r[f"ours_{kind}{suffix}"] / 1e6
    return f"{gbps:.0f} ({100 * gbps / copy_gbps:.0f}%)"


def to_markdown(rows, device: str, meta: dict) -> str:
    names = [n for n in ("ours", *PEER_NAMES, "compiled", "reference")
             if any(f"{n}_fwd" in r or f"{n}_error" in r for r in rows)]
    peer_names = [n for n in names if n in PEER_NAMES]
    lines = [
        f"# Attention Residuals read on {device}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}. B*T = {B * T} (B={B}, T={T}), bf16, "
        f"one query with a key-norm weight. Copy bandwidth measured in the same run: "
        f"**{meta['copy_gbps']:.0f} GB/s** (each row's own run: `copy_gbps` in the json). "
        "Command: `python benchmarks/bench_attnres.py`.",
        "",
        "Peers: " + (", ".join(f"{k} {v}" for k, v in meta.get("peers", {}).items()) or "none installed") + ". "
        f"`compiled` is `torch.compile(dynamic={meta.get('compile_dynamic', True)})` of the plain formula. "
        "Milliseconds (median), forward / forward+backward. GB/s counts the bytes the op must move "
        "((N+1) rows of D per token forward, (3N+3) forward+backward); `x` = failed at this shape, "
        "`-` = not run (peer not installed in that run).",
        "",
        "| N | D | " + " | ".join(names) + " | ours fwd GB/s (% copy) | ours fwd+bwd GB/s (% copy) | "
        + " | ".join(f"fwd+bwd {p}/ours" for p in peer_names) + " |",
        "|" + "---|" * (4 + len(names) + len(peer_names)),
    ]
    for r in rows:
        cells = [f"{r[f'{n}_fwd']:.3f} / {r[f'{n}_fwdbwd']:.3f}" if f"{n}_fwd" in r else _missing(r, n) for n in names]
        copy = r.get("copy_gbps", meta["copy_gbps"])
        lines.append(f"| {r['N']} | {r['D']} | " + " | ".join(cells) + " | "
                     + f"{_gbps(r, 'fwd', copy)} | {_gbps(r, 'fwdbwd', copy)} | "
                     + " | ".join(_ratio(r, p, "fwdbwd") for p in peer_names) + " |")
    graphed = [r for r in rows if "ours_fwdbwd_graph" in r]
    if graphed:
        timed = [n for n in names if n != "reference"]
        lines += ["", "**GPU time alone**: forward+backward replayed from a CUDA graph "
                  "(`triton.testing.do_bench_cudagraph`), so no candidate's host overhead is in it; the table "
                  "above times eager calls, as a user without graphs sees them. Milliseconds; ratios = peer / ours.",
                  "", "| N | D | " + " | ".join(timed) + " | ours fwd+bwd GB/s (% copy) | "
                  + " | ".join(f"{p}/ours" for p in peer_names) + " |",
                  "|" + "---|" * (3 + len(timed) + len(peer_names))]
        for r in graphed:
            cells = [f"{r[f'{n}_fwdbwd_graph']:.3f}" if f"{n}_fwdbwd_graph" in r else _missing(r, n) for n in timed]
            lines.append(f"| {r['N']} | {r['D']} | " + " | ".join(cells)
                         + f" | {_gbps(r, 'fwdbwd', r.get('copy_gbps', meta['copy_gbps']), '_graph')} | "
                         + " | ".join(_ratio(r, p, "fwdbwd_graph") for p in peer_names) + " |")
    errors = [(r["N"], r["D"], k[: -len("_error")], v) for r in rows for k, v in r.items() if k.endswith("_error")]
    if errors:
        lines += ["", "Failures:", ""] + [f"- N={n}, D={d}, {name}: `{msg}`" for n, d, name, msg in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true", help="also sweep our kernels' tiles at every shape")
    parser.add_argument("--shapes", type=int, nargs="*", help="indices into SHAPES to run (default: all); rows of "
                        "other shapes already in the results file are kept")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for json/md results")
    parser.add_argument("--peer-timeout", type=float, default=180,
                        help="seconds a peer's first call at a shape may take (0: no limit)")
    parser.add_argument("--peers", nargs="*", choices=PEER_NAMES, help="peers to run (default: every one installed)")
    parser.add_argument("--probe", nargs=3, metavar=("PEER", "N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:  # child process of first_call_in_child
        name, N, D = args.probe[0], int(args.probe[1]), int(args.probe[2])
        _first_step(peers()[name], inputs(N, D))
        return 0
    if not torch.cuda.is_available():
        print("bench_attnres.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per shape
    device, slug = device_slug()
    copy_gbps = copy_bandwidth()
    print(f"{device}: copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    peer_fns = {name: fn for name, fn in peers().items() if args.peers is None or name in args.peers}
    shapes = [SHAPES[i] for i in (args.shapes if args.shapes else range(len(SHAPES)))]
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "copy_gbps": copy_gbps,
            "compile_dynamic": COMPILE_DYNAMIC, "peers": peer_versions()}
    rows, md = [], ""
    for N, D in shapes:
        t0 = time.time()
        if args.tune:
            tune(N, D)
        print(f"N={N} D={D}", flush=True)
        shape_peers, notes = peer_fns, {}
        if args.peer_timeout:
            shape_peers, notes = peers_within(peer_fns, N, D, args.peer_timeout)
        row = run_shape(N, D, shape_peers)
        row.update(notes)
        row["copy_gbps"], row["date"] = copy_gbps, time.strftime("%Y-%m-%d %H:%M")
        rows.append(row)
        print(f"N={N} D={D} ({time.time() - t0:.0f}s): "
              + ", ".join(f"{k}={v:.3g}" for k, v in row.items() if isinstance(v, float)), flush=True)
        # Written after every shape: peers autotune for minutes, and a cut-off run keeps what it measured.
        md = save_results(Path(args.out), f"attnres_{slug}", meta, rows, key=lambda r: (r["N"], r["D"]),
                          order=lambda r: SHAPES.index((r["N"], r["D"])) if (r["N"], r["D"]) in SHAPES else len(SHAPES),
                          markdown=lambda rows, meta: to_markdown(rows, device, meta))
        torch.cuda.empty_cache()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
