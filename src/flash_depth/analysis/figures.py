"""Figures and the markdown report of ``flash-depth analyze`` (one checkpoint or several overlaid)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        integer_axis = ax.yaxis if ax.images else ax.xaxis  # heatmaps: layers on y; curves: layers on x
        integer_axis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _lines(results: dict, key: str, ax, ylabel: str, title: str, style="-o"):
    for i, (name, r) in enumerate(results.items()):
        if r.get(key):
            ax.plot(range(len(r[key])), r[key], style, ms=3, label=name, color=f"C{i}")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def make_figures(results: dict, out: Path) -> list[Path]:
    """``results``: checkpoint name -> analyze_model() output. Returns the PNG paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with_depth = {n: r for n, r in results.items() if r["depth_mechanism"] == "moda" and r["slot_mass"]}
    with_slots = {n: r for n, r in results.items() if r["slot_mass"]}

    if with_depth:  # 1. depth vs sequence mass per layer and head (MoDA: one softmax over both)
        fig, axes = plt.subplots(1, len(with_depth), figsize=(4.5 * len(with_depth), 4), squeeze=False)
        for ax, (name, r) in zip(axes[0], with_depth.items()):
            mass = np.array(r["depth_mass"])
            im = ax.imshow(mass, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"{name}: softmax mass on depth slots")
            fig.colorbar(im, ax=ax, label="share of attention (0-1)")
        paths.append(_save(fig, out / "depth_mass.png"))

        # 2. example attention maps over [sequence KV | depth KV], boundary marked (MoDA Fig. 5)
        name, r = next(iter(with_depth.items()))
        layers = [i for i in sorted(r["examples"]) if r["examples"][i].shape[-1] > r["example_boundary"][i]]
        picks = sorted({layers[len(layers) // 3], layers[2 * len(layers) // 3], layers[-1]}) if layers else []
        if picks:
            fig, axes = plt.subplots(1, len(picks), figsize=(5 * len(picks), 4.2), squeeze=False)
            for ax, layer in zip(axes[0], picks):
                p = r["examples"][layer][0].numpy()  # head 0
                n = r["example_boundary"][layer]
                im = ax.imshow(np.log10(p + 1e-6), aspect="auto", cmap="magma", vmin=-4, vmax=0)
                ax.axvline(n - 0.5, color="cyan", lw=1.5)
                ax.set_title(f"{name}, layer {layer}, head 0")
                ax.set_xlabel(f"key: sequence (0..{n - 1}) | depth slots")
                ax.set_ylabel("query token")
                fig.colorbar(im, ax=ax, label="log10 probability")
            paths.append(_save(fig, out / "attention_maps.png"))

    if with_slots:  # 3. which depth slots are read most
        fig, axes = plt.subplots(1, len(with_slots), figsize=(5.5 * len(with_slots), 4.2), squeeze=False)
        for ax, (name, r) in zip(axes[0], with_slots.items()):
            n_slots = len(r["slot_names"])
            grid = np.full((r["layers"], n_slots), np.nan)
            for layer, mass in r["slot_mass"].items():
                grid[int(layer), : len(mass)] = mass
            im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
            step = max(1, n_slots // 12)
            ax.set_xticks(range(0, n_slots, step))
            ax.set_xticklabels(r["slot_names"][::step], rotation=60, fontsize=7)
            ax.set_xlabel("depth slot (writer)")
            ax.set_ylabel("reading layer")
            ax.set_title(f"{name}: mass per depth slot")
            fig.colorbar(im, ax=ax, label="mean probability")
        paths.append(_save(fig, out / "depth_slots.png"))

    with_distance = {n: r for n, r in results.items() if r.get("distance_mass")}
    if with_distance:  # 3b. mass by slot distance: what a bounded depth window keeps and drops
        fig, axes = plt.subplots(1, len(with_distance), figsize=(5.5 * len(with_distance), 4.2), squeeze=False)
        for ax, (name, r) in zip(axes[0], with_distance.items()):
            rows = r["distance_mass"]
            width = max(len(m) for m in rows.values())
            grid = np.full((r["layers"], width), np.nan)
            for layer, mass in rows.items():
                grid[int(layer), : len(mass)] = mass
            im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower",
                           extent=(0.5, width + 0.5, -0.5, r["layers"] - 0.5))
            window = (r.get("depth_window") or {}).get("window")
            if window is not None and window < width:
                ax.axvline(window + 0.5, color="cyan", lw=1.5, label=f"window {window}")
                ax.legend(fontsize=8, loc="upper right")
            ax.set_xlabel("slot distance (1 = the slot written last)")
            ax.set_ylabel("reading layer")
            ax.set_title(f"{name}: mass by depth-slot distance")
            fig.colorbar(im, ax=ax, label="mean probability")
        paths.append(_save(fig, out / "depth_distance.png"))

    with_attention = {n: r for n, r in results.items() if r["sink_first"]}
    if with_attention:  # 4. attention sink
        fig, ax = plt.subplots(figsize=(7, 4))
        _lines(with_attention, "sink_first", ax, "mass on token 0", "attention sink: mass on the first token")
        for i, (name, r) in enumerate(with_attention.items()):
            ax.plot(range(len(r["sink_first4"])), r["sink_first4"], "--", alpha=0.6, color=f"C{i}",
                    label=f"{name} (first 4)")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / "attention_sink.png"))

    # 5. layer usefulness
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, r in results.items():
        labels = [f"{s['layer']}{s['sublayer'][0]}" for s in r["sublayers"]]
        axes[0].plot(range(len(labels)), [s["one_minus_cos"] for s in r["sublayers"]], "-o", ms=3, label=name)
        axes[1].plot(range(len(labels)), [s["relative_update"] for s in r["sublayers"]], "-o", ms=3, label=name)
    thr = next(iter(results.values()))["near_identity_threshold"]
    axes[0].axhline(thr, color="gray", ls=":", label=f"near-identity threshold {thr}")
    axes[0].set_yscale("log")
    axes[0].set_title("1 - cos(input, output) per sublayer")
    axes[1].set_title("|output - input| / |input| per sublayer")
    for ax in axes:
        ax.set_xlabel("sublayer (in order: attention, FFN per block)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / "layer_usefulness.png"))

    # 6. hidden-state norm growth and gradient norm per layer
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    _lines(results, "hidden_norm", axes[0], "mean L2 norm", "hidden-state norm per layer")
    _lines(results, "grad_norm", axes[1], "L2 norm of block parameter gradients", "gradient norm per layer")
    axes[1].set_yscale("log")
    paths.append(_save(fig, out / "norms.png"))

    with_attnres = {n: r for n, r in results.items() if r["attnres_weights"]}
    if with_attnres:  # 7. AttnRes source weights
        fig, axes = plt.subplots(1, len(with_attnres), figsize=(5 * len(with_attnres), 4.2), squeeze=False)
        for ax, (name, r) in zip(axes[0], with_attnres.items()):
            rows = r["attnres_weights"]
            grid = np.full((len(rows), max(len(w) for w in rows)), np.nan)
            for i, w in enumerate(rows):
                grid[i, : len(w)] = w
            im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower", vmin=0, vmax=1)
            ax.set_xlabel("source (0 = embedding)")
            ax.set_ylabel("read (sublayer; last = final read)")
            ax.set_title(f"{name}: AttnRes weights")
            fig.colorbar(im, ax=ax, label="softmax weight")
        paths.append(_save(fig, out / "attnres_weights.png"))

    with_hyper = {n: r for n, r in results.items() if r.get("hyper")}
    if with_hyper:  # 8. mHC / HC mixes per sublayer, averaged over tokens
        fig, axes = plt.subplots(len(with_hyper), 3, figsize=(15, 4.2 * len(with_hyper)), squeeze=False,
                                 gridspec_kw={"width_ratios": [1, 1, 2.5]})
        for row, (name, r) in zip(axes, with_hyper.items()):
            h = {k: np.array(v) for k, v in r["hyper"].items()}
            n = h["h_pre"].shape[1]
            panels = [("h_pre", h["h_pre"], "H_pre (read weight per stream)"),
                      ("h_post", h["h_post"], "H_post (write weight per stream)"),
                      ("h_res", h["h_res"].reshape(len(h["h_res"]), n * n), "H_res rows i, columns j (i*n + j)")]
            for ax, (key, grid, title) in zip(row, panels):
                im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
                if key == "h_res":
                    for edge in range(n, n * n, n):
                        ax.axvline(edge - 0.5, color="white", lw=0.8)
                ax.set_xlabel("entry" if key == "h_res" else "stream")
                ax.set_ylabel("sublayer (attention, FFN per block)")
                ax.set_title(f"{name}: {title}", fontsize=9)
                fig.colorbar(im, ax=ax)
        paths.append(_save(fig, out / "mhc_mixing.png"))

    with_mudd = {n: r for n, r in results.items() if r.get("mudd_weights")}
    if with_mudd:  # 9. MUDD dense weights per block and way, averaged over tokens
        fig, axes = plt.subplots(len(with_mudd), 4, figsize=(18, 4.2 * len(with_mudd)), squeeze=False)
        for row, (name, r) in zip(axes, with_mudd.items()):
            blocks = r["mudd_weights"]  # [block][way][source]
            grids = np.full((4, len(blocks), len(blocks) + 1), np.nan)
            for i, ways in enumerate(blocks):
                for s, w in enumerate(ways):  # after the last block one way, the output: shown with r
                    grids[3 if len(ways) == 1 else s, i, : len(w)] = w
            bound = max(1e-6, float(np.nanmax(np.abs(grids))))
            for ax, grid, way in zip(row, grids, ("q", "k", "v", "r (last row: the output)")):
                im = ax.imshow(grid, aspect="auto", cmap="coolwarm", origin="lower", vmin=-bound, vmax=bound)
                ax.set_xlabel("source (0 = embedding, j = block j's output)")
                ax.set_ylabel("after block")
                ax.set_title(f"{name}: MUDD weights, way {way}", fontsize=9)
                fig.colorbar(im, ax=ax)
        paths.append(_save(fig, out / "mudd_weights.png"))
    return paths


def write_outputs(results: dict, out: Path) -> dict:
    """Figures, analysis.json (every number) and report.md."""
    paths = make_figures(results, out)
    numbers = {name: {k: v for k, v in r.items() if k not in ("examples", "example_boundary")}
               for name, r in results.items()}
    (out / "analysis.json").write_text(json.dumps(numbers, indent=1))
    lines = ["# Depth retrieval diagnostics", ""]
    lines += ["| checkpoint | mechanism | norm | mean depth mass (layers >= 1) | sink (token 0, mean over layers) "
              "| near-identity sublayers | final hidden norm |", "|---|---|---|---|---|---|---|"]
    for name, r in numbers.items():
        moda = r["depth_mechanism"] == "moda" and len(r["depth_mass"]) > 1
        depth = f"{np.mean(r['depth_mass'][1:]):.3f}" if moda else "-"
        sink = f"{np.mean(r['sink_first']):.3f}" if r["sink_first"] else "-"
        hidden = f"{r['hidden_norm'][-1]:.2f}" if r["hidden_norm"] else "-"
        lines.append(f"| {name} | {r['depth_mechanism']} | {r['norm_position']} | {depth} | {sink} "
                     f"| {r['near_identity']} of {len(r['sublayers'])} (1-cos < {r['near_identity_threshold']}) "
                     f"| {hidden} |")
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in paths]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"figures": [str(p) for p in paths], "json": str(out / "analysis.json"), "report": str(out / "report.md")}
