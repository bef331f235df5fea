"""Report rendering: throughput tables (text, JSON, CSV), bar chart, GPU timeline, HTML report.

matplotlib is an optional dependency (``pip install tao-gpusched[reports]``) and slow to
import, so it is imported inside the plotting functions only. Figures are drawn on an explicit
Agg canvas, never through pyplot, so no global backend or figure state is touched.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gpusched.render import safe
from gpusched.speedmodel import SpeedModel
from gpusched.throughput import SetStats, clip_span, span_uuids

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Target = str | Path | IO[bytes]

DPI = 100
#: timeline size: width_px × (TIMELINE_BASE_PX + TIMELINE_ROW_PX × rows) at DPI, rows = GPUs
TIMELINE_BASE_PX = 200
TIMELINE_ROW_PX = 60

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
KIND_COLOURS: dict[str, str] = {
    "tao:train": "#0072B2", "tao:retrain": "#56B4E9", "tao:prune": "#E69F00", "tao:evaluate": "#009E73",
    "tao:export": "#CC79A7", "tao:inference": "#D55E00", "job": "#7A7A7A",
}
_EXTRA_COLOURS = ["#F0E442", "#882255", "#44AA99", "#999933", "#332288", "#AA4499"]
_FAILED_EDGE = "#C00000"
_FAILED = {"failed", "lost", "cancelled"}


def _kind_colour(kind: str, extra: dict[str, str]) -> str:
    if kind in KIND_COLOURS:
        return KIND_COLOURS[kind]
    if kind not in extra:
        extra[kind] = _EXTRA_COLOURS[len(extra) % len(_EXTRA_COLOURS)]
    return extra[kind]


def _text_colour(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _plain(text: str) -> str:
    """Keep matplotlib from reading ``$...$`` in user text as mathtext."""
    return text.replace("$", r"\$")


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _secs(x: float | None) -> str:
    """Seconds per epoch: one decimal for real runs, two significant digits below 10 s."""
    return "-" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.2g}"


# -- throughput: text, JSON, CSV ----------------------------------------------------------------

TABLE_HEADERS = ("WORKLOAD", "GPU SET", "GPUS", "S/EPOCH MEDIAN", "P90", "EPOCHS/H", "SAMPLES",
                 "CONFIDENCE", "SCALING")


def _table_row(s: SetStats) -> list[str]:
    return [safe(s.workload or "-"), safe(s.gpu_set), str(s.gpu_count), _secs(s.median_s), _secs(s.p90_s),
            _fmt(s.epochs_per_hour), str(s.samples), s.confidence, _fmt(s.scaling_efficiency, 2)]


def speed_lines(model: SpeedModel, names: Sequence[str]) -> list[str]:
    """One line per GPU model: its speed relative to the slowest, and where that comes from
    (fitted from epochs of any workload, the prior, or the default 1)."""
    models = sorted(set(names), key=lambda m: (-model.speed(m), m))
    if not models:
        return []
    slowest = min(model.speed(m) for m in models)
    width = max(len(safe(m)) for m in models)
    out = ["Speed factors (all workloads; 1.00 = the slowest GPU model here):"]
    for m in models:
        out.append(f"  {safe(m):<{width}}  {model.speed(m) / slowest:5.2f}  "
                   f"({_SPEED_SOURCE[model.speed_source(m)]})")
    counts = sorted(model.efficiency_measured)
    if counts:
        out.append("  scaling efficiency: " + ", ".join(
            f"{n} GPUs {model.eff(n):.2f}" for n in counts) + " (fitted)")
    others = sorted(set(model.efficiency) - set(counts))
    if others or not counts:
        which = ", ".join(f"{n} GPUs" for n in others) or "any count"
        out.append(f"  scaling efficiency: {model.prior_efficiency:.2f} for {which} (prior: no "
                   "workload ran on one GPU and on more)")
    return out


def speed_model(epochs: Sequence[dict[str, Any]], gpus: Sequence[dict[str, Any]]) -> SpeedModel:
    """The daemon's speed model as a report can rebuild it: the epochs it was given and each
    GPU's prior speed from ``/v1/gpus``."""
    prior = {str(g["name"]): float(g["speed"]) for g in gpus if g.get("speed")}
    return SpeedModel.fit(epochs, prior)


def advice(stats: list[SetStats], model: SpeedModel) -> list[str]:
    """Recommendations, with the model's one-card times where a card never ran alone."""
    from gpusched.throughput import recommend

    return recommend(stats, lambda wl, models: model.predict(wl, models).s_per_epoch)


def gpu_notes(gpus: Sequence[dict[str, Any]]) -> list[str]:
    if any(g.get("simulated") for g in gpus):
        return ["the GPUs are simulated: epoch times are what the jobs reported (a fake TAO "
                "reports scaled times), not measurements of real GPUs"]
    return []


_SPEED_SOURCE = {"fitted": "fitted from measured epochs", "prior": "prior: configured, NVML or "
                 "simulated spec", "default": "no data, no prior"}


def throughput_table(stats: Sequence[SetStats], recs: Sequence[str], *,
                     model: SpeedModel | None = None, gpu_names: Sequence[str] = (),
                     notes: Sequence[str] = ()) -> str:
    """Aligned plain text: notes (simulated GPUs, scaled times), one line per (workload, GPU
    set), the speed factor of each GPU model, then the recommendations."""
    head = [f"Note: {safe(n)}" for n in notes]
    if not stats:
        return "\n".join([*head, "No training epochs recorded yet (warm-up and validation "
                                  "epochs are not counted)."]) + "\n"
    rows = [list(TABLE_HEADERS)] + [_table_row(s) for s in stats]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADERS))]
    numeric = {2, 3, 4, 5, 6, 8}
    lines = [*head, *([""] if head else [])]
    lines += ["  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
              for r in rows]
    lines.append("")
    if model is not None:
        names = [*gpu_names, *(m for st in stats for m in st.gpu_models)]
        lines += [*speed_lines(model, names), ""]
    if recs:
        lines.append("Recommendations:")
        lines.extend(f"  - {safe(r)}" for r in recs)
    else:
        lines.append("No recommendations yet (each GPU set compared needs at least 2 samples).")
    return "\n".join(lines) + "\n"


def throughput_json(stats: Sequence[SetStats], recs: Sequence[str],
                    busy: dict[str, float] | None = None) -> dict[str, Any]:
    """``{"sets": [...], "recommendations": [...], "busy_fraction": {uuid: fraction}}``."""
    return {
        "sets": [{**asdict(s), "gpu_models": list(s.gpu_models)} for s in stats],
        "recommendations": list(recs),
        "busy_fraction": dict(busy or {}),
    }


def throughput_csv(stats: Sequence[SetStats]) -> str:
    """One row per set; ``gpu_models`` joined with ``" + "``, unknown values left empty."""
    buf = io.StringIO()
    names = [f.name for f in fields(SetStats)]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(names)
    for s in stats:
        row = asdict(s)
        row["gpu_models"] = " + ".join(s.gpu_models)
        writer.writerow(["" if row[n] is None else row[n] for n in names])
    return buf.getvalue()


# -- figures --------------------------------------------------------------------------------------

def _figure(width_px: int, height_px: int) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, target: Target, fmt: str) -> None:
    if fmt not in ("png", "svg"):
        raise ValueError(f"unsupported image format {fmt!r} (png or svg)")
    # no bbox_inches="tight": the pixel size must stay the documented one
    meta = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
    fig.savefig(target, format=fmt, dpi=DPI, metadata=meta)


def _text_px(fig: Figure, labels: Sequence[str], fontsize: float) -> float:
    """The widest of ``labels`` in pixels as this figure would draw them."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    widest = 0.0
    for label in labels:
        t = fig.text(0, 0, label, fontsize=fontsize, parse_math=False)
        widest = max(widest, t.get_window_extent(renderer).width)
        t.remove()
    return widest


def _tidy(ax: Any) -> None:
    ax.grid(axis="x", color="#E5E5E5")
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


def _margins(fig: Figure, width_px: int, height_px: int, *, left: int, right: int, top: int,
             bottom: int) -> None:
    fig.subplots_adjust(left=left / width_px, right=1 - right / width_px,
                        top=1 - top / height_px, bottom=bottom / height_px)


def throughput_plot(stats: Sequence[SetStats], path_or_buffer: Target, fmt: str = "png") -> None:
    """Horizontal bars: median s/epoch per (workload, GPU set), whisker up to p90.

    Size: 1000 × (140 + 44 × bars + 20 × workloads) px at 100 dpi. Bars are coloured by
    workload; the workload legend sits above the bars.
    """
    n = max(1, len(stats))
    workloads = list(dict.fromkeys(s.workload or "-" for s in stats))
    top = 50 + 20 * len(workloads)
    width_px, height_px = 1000, 90 + top + 44 * n
    fig = _figure(width_px, height_px)
    labels = [s.gpu_set for s in stats]
    left = int(min(420, max(100, 24 + _text_px(fig, labels, 10))))
    _margins(fig, width_px, height_px, left=left, right=40, top=top, bottom=60)
    ax = fig.add_subplot()
    fig.text(left / width_px, 1 - 22 / height_px, "Median seconds per training epoch (whisker: p90)",
             fontsize=12, va="center")
    if not stats:
        ax.text(0.5, 0.5, "no training epochs recorded yet", ha="center", va="center",
                transform=ax.transAxes, color="#555555")
        ax.set_axis_off()
        _save(fig, path_or_buffer, fmt)
        return
    palette = list(KIND_COLOURS.values())
    colour = {w: palette[i % len(palette)] for i, w in enumerate(workloads)}
    ys = list(range(len(stats)))
    medians = [s.median_s for s in stats]
    upper = [max(0.0, s.p90_s - s.median_s) for s in stats]
    for wl in workloads:
        idx = [i for i, s in enumerate(stats) if (s.workload or "-") == wl]
        ax.barh([ys[i] for i in idx], [medians[i] for i in idx], height=0.6, color=colour[wl],
                xerr=[[0.0] * len(idx), [upper[i] for i in idx]], capsize=4,
                error_kw={"ecolor": "#333333", "elinewidth": 1}, label=_plain(wl))
    right_edge = max(s.p90_s for s in stats)
    for y, s in zip(ys, stats, strict=True):
        ax.text(max(s.p90_s, s.median_s) + right_edge * 0.01, y,
                f"{_secs(s.median_s)} s · {s.epochs_per_hour:.0f} epochs/h · n={s.samples}",
                va="center", fontsize=9, color="#222222")
    ax.set_yticks(ys, [_plain(label) for label in labels])
    ax.invert_yaxis()
    ax.set_xlim(0, right_edge * 1.6)
    ax.set_xlabel("seconds per epoch")
    _tidy(ax)
    fig.legend(loc="upper left", fontsize=9, frameon=False, ncol=1, handlelength=1.2,
               borderaxespad=0, bbox_to_anchor=(left / width_px, 1 - 38 / height_px))
    _save(fig, path_or_buffer, fmt)


def _gpu_rows(spans: Sequence[dict[str, Any]], gpus: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(uuid, label) per timeline row: the inventory, then GPUs only spans still name."""
    rows = [(g["uuid"], f"{g['index']}: {g['name']}") for g in sorted(gpus, key=lambda g: g["index"])]
    known = {u for u, _ in rows}
    for s in spans:
        names = list(s.get("gpu_names") or [])
        indices = list(s.get("gpu_indices") or [])
        for i, uuid in enumerate(span_uuids(s)):
            if uuid not in known:
                known.add(uuid)
                idx = indices[i] if i < len(indices) else "?"
                name = names[i] if i < len(names) else uuid[:12]
                rows.append((uuid, f"{idx}: {name}"))
    return rows


def timeline_size(n_rows: int, width_px: int = 1400) -> tuple[int, int]:
    """The timeline's pixel size for ``n_rows`` GPUs: width × (200 + 60 × rows), at least 1 row."""
    return width_px, TIMELINE_BASE_PX + TIMELINE_ROW_PX * max(1, n_rows)


def timeline_plot(spans: Sequence[dict[str, Any]], gpus: Sequence[dict[str, Any]], since: float,
                  until: float, path_or_buffer: Target, fmt: str = "png", width_px: int = 1400,
                  height_px: int | None = None) -> None:
    """Gantt chart: one row per GPU, one bar per job span on each of its GPUs.

    Size: ``width_px`` × ``height_px`` px at 100 dpi; by default 1400 × (200 + 60 × n_gpus), where
    n_gpus counts the inventory plus any GPU a span names that the inventory lacks. Bars are
    coloured by stage kind, labelled with the job id (and name when it fits), hatched while
    running (drawn up to ``until``) and outlined red when the job failed. Idle time is blank.
    Times are the host's local time.
    """
    import matplotlib.dates as mdates
    from matplotlib.patches import Patch

    rows = _gpu_rows(spans, gpus)
    if height_px is None:
        width_px, height_px = timeline_size(len(rows), width_px)
    fig = _figure(width_px, height_px)
    left = int(min(480, max(100, 24 + _text_px(fig, [label for _, label in rows], 10))))
    _margins(fig, width_px, height_px, left=left, right=30, top=120, bottom=80)
    ax = fig.add_subplot()
    row_of = {uuid: i for i, (uuid, _) in enumerate(rows)}

    def num(t: float) -> float:
        return float(mdates.date2num(datetime.fromtimestamp(t)))

    x0, x1 = num(since), num(until)
    axes_px = width_px - left - 30
    px_per_unit = axes_px / (x1 - x0) if x1 > x0 else 0.0
    extra: dict[str, str] = {}
    kinds_seen: dict[str, str] = {}
    any_running = any_failed = False
    for span in sorted(spans, key=lambda s: (s.get("started_at") or 0, s.get("job_id") or 0)):
        clipped = clip_span(span, since, until)
        if clipped is None:
            continue
        kind = str(span.get("kind") or "job")
        colour = _kind_colour(kind, extra)
        kinds_seen[kind] = colour
        running = span.get("ended_at") is None
        failed = str(span.get("status") or "") in _FAILED
        any_running |= running
        any_failed |= failed
        lo, hi = num(clipped[0]), num(clipped[1])
        for uuid in span_uuids(span):
            y = row_of[uuid]
            ax.broken_barh([(lo, hi - lo)], (y - 0.36, 0.72), facecolors=colour,
                           edgecolors=_FAILED_EDGE if failed else "white",
                           linewidth=2.0 if failed else 0.8, hatch="///" if running else None)
            label = _bar_label(span, (hi - lo) * px_per_unit)
            if label:
                ax.text(lo + (hi - lo) / 2, y, label, ha="center", va="center", fontsize=9,
                        color=_text_colour(colour), clip_on=True, parse_math=False,
                        bbox={"boxstyle": "round,pad=0.25", "facecolor": colour, "edgecolor": "none"}
                        if running else None)
    ax.set_xlim(x0, x1)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)), [_plain(label) for _, label in rows])
    for y in range(len(rows) - 1):
        ax.axhline(y + 0.5, color="#E5E5E5", linewidth=0.8)
    locator = mdates.AutoDateLocator(minticks=5, maxticks=12)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    _tidy(ax)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("local time")
    start_s = datetime.fromtimestamp(since).strftime("%Y-%m-%d %H:%M")
    end_s = datetime.fromtimestamp(until).strftime("%Y-%m-%d %H:%M")
    fig.text(left / width_px, 1 - 28 / height_px, f"GPU timeline  {start_s} → {end_s}",
             fontsize=13, va="center", ha="left")
    handles = [Patch(facecolor=c, label=k) for k, c in kinds_seen.items()]
    if any_running:
        handles.append(Patch(facecolor="white", edgecolor="#555555", hatch="///", label="running"))
    if any_failed:
        handles.append(Patch(facecolor="white", edgecolor=_FAILED_EDGE, linewidth=2,
                             label="failed / lost / cancelled"))
    if handles:
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        for ncol in range(len(handles), 0, -1):  # as few legend rows as the width allows
            legend = fig.legend(handles=handles, loc="center left", ncol=ncol, frameon=False,
                                fontsize=9, bbox_to_anchor=(left / width_px, 1 - 72 / height_px))
            if ncol == 1 or legend.get_window_extent(renderer).width <= width_px - left - 10:
                break
            legend.remove()
    if not kinds_seen:
        ax.text(0.5, 0.5, "no jobs in this window", ha="center", va="center", color="#666666",
                transform=ax.transAxes)
    _save(fig, path_or_buffer, fmt)


def _bar_label(span: dict[str, Any], width_px: float) -> str:
    """``#id name`` when it fits the bar, else ``#id``, else nothing (no overlapping text)."""
    char_px = 6.5
    job = f"#{span.get('job_id')}"
    name = str(span.get("name") or "")
    full = f"{job} {name}" if name else job
    if len(full) * char_px + 8 <= width_px:
        return full
    if len(job) * char_px + 6 <= width_px:
        return job
    return ""


# -- HTML -------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1440px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{padding:4px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;border:1px solid #eee}
.bar{background:#eee;width:240px;height:12px;display:inline-block;vertical-align:middle}
.bar span{background:#0072B2;height:12px;display:block}
.muted{color:#666}
.note{background:#fff7e0;border-left:4px solid #E69F00;padding:6px 10px}
"""


#: what a page says where a chart would be when matplotlib (the ``reports`` extra) is missing
NO_CHARTS = ("Chart left out: matplotlib is not installed "
             "(pip install 'tao-gpusched[reports]', or the checkout's scripts/setup).")


def _img(draw: Callable[[IO[bytes]], None], alt: str) -> str:
    buf = io.BytesIO()
    try:
        draw(buf)
    except ImportError as err:
        if err.name is None or not err.name.startswith("matplotlib"):
            raise
        return f'<p class="muted">{html.escape(NO_CHARTS)}</p>'
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def _section(id_: str, title: str, *parts: str) -> str:
    return f'<section id="{id_}">\n<h2>{html.escape(title)}</h2>\n' + "\n".join(parts) + "\n</section>"


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{html.escape(c)}</td>' if i in numeric
                         else f"<td>{html.escape(c)}</td>" for i, c in enumerate(r)) + "</tr>\n"
        for r in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _busy_section(busy: dict[str, float], gpus: Sequence[dict[str, Any]]) -> str:
    by_uuid = {g["uuid"]: g for g in gpus}
    order = sorted(busy, key=lambda u: (by_uuid.get(u, {}).get("index", 1 << 30), u))
    rows = []
    for uuid in order:
        g = by_uuid.get(uuid)
        label = f"{g['index']}: {g['name']}" if g else uuid
        pct = 100 * busy[uuid]
        rows.append(f"<tr><td>{html.escape(label)}</td><td class=\"n\">{pct:.1f}%</td>"
                    f"<td><span class=\"bar\"><span style=\"width:{pct:.1f}%\"></span></span></td>"
                    f"<td class=\"muted\">{html.escape(uuid)}</td></tr>")
    if not rows:
        return '<p class="muted">No GPUs known.</p>'
    return ("<table>\n<thead><tr><th>GPU</th><th>busy</th><th></th><th>UUID</th></tr></thead>\n"
            "<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>")


def _span_table(spans: Sequence[dict[str, Any]], since: float, until: float) -> str:
    rows = []
    for s in sorted(spans, key=lambda s: (s.get("started_at") or 0, s.get("job_id") or 0)):
        if clip_span(s, since, until) is None:
            continue
        start = s.get("started_at")
        end = s.get("ended_at")
        rows.append([
            str(s.get("job_id")), str(s.get("attempt") or ""), str(s.get("name") or ""),
            str(s.get("kind") or ""), str(s.get("status") or ""),
            ", ".join(str(i) for i in s.get("gpu_indices") or []),
            datetime.fromtimestamp(start).strftime("%Y-%m-%d %H:%M:%S") if start else "",
            datetime.fromtimestamp(end).strftime("%Y-%m-%d %H:%M:%S") if end else "running",
        ])
    if not rows:
        return '<p class="muted">No jobs in this window.</p>'
    return ("<details><summary>Jobs in this window</summary>\n"
            + _html_table(["JOB", "ATTEMPT", "NAME", "KIND", "STATUS", "GPUS", "STARTED", "ENDED"],
                          rows, {0, 1}) + "\n</details>")


def _window(since: float, until: float) -> str:
    fmt = "%Y-%m-%d %H:%M"
    return (f"<p class=\"muted\">Window: {datetime.fromtimestamp(since).strftime(fmt)} → "
            f"{datetime.fromtimestamp(until).strftime(fmt)} (local time)</p>")


def _gpu_list(gpus: Sequence[dict[str, Any]]) -> str:
    rows = [[str(g.get("index", "")), str(g.get("name", "")),
             f"{(g.get('memory_total_mib') or 0) / 1024:.1f} GiB", str(g.get("state") or ""),
             "yes" if g.get("simulated") else "no", str(g.get("uuid", ""))]
            for g in sorted(gpus, key=lambda g: g.get("index", 0))]
    if not rows:
        return '<p class="muted">No GPUs known.</p>'
    return _html_table(["#", "GPU", "memory", "state", "simulated", "UUID"], rows, {0, 2})


def _provenance(gpus: Sequence[dict[str, Any]], time_scale: float | None) -> str:
    """Say where the figures come from when they are not a real GPU's real seconds."""
    notes = []
    if any(g.get("simulated") for g in gpus):
        notes.append("Simulated GPUs (--simulate-gpus): no real GPU ran these jobs; the GPU "
                     "names and memory are the simulation's.")
    if time_scale is not None:
        notes.append(f"Scaled time: the jobs ran at {time_scale:g}× real time (the demo's fake "
                     "TAO), so seconds per epoch, epochs/h and the timeline are scaled, not a GPU's "
                     "real speed.")
    return f'<p class="note">{html.escape(" ".join(notes))}</p>' if notes else ""


def html_report(stats: Sequence[SetStats], recs: Sequence[str], busy: dict[str, float],
                spans: Sequence[dict[str, Any]], gpus: Sequence[dict[str, Any]], since: float,
                until: float, *, title: str = "gpusched report",
                time_scale: float | None = None) -> str:
    """One self-contained HTML page: the GPUs, throughput table and chart, recommendations, busy
    fraction, timeline. Charts are embedded base64 PNGs; no external resources. Simulated GPUs
    and a ``time_scale`` (the demo's scaled time) are said at the top and in the headings."""
    if stats:
        table = _html_table(TABLE_HEADERS, [_table_row(s) for s in stats], {2, 3, 4, 5, 6, 8})
    else:
        table = '<p class="muted">No training epochs recorded yet.</p>'
    chart = _img(lambda b: throughput_plot(stats, b), "median seconds per epoch by GPU set")
    rec_html = ("<ul>\n" + "\n".join(f"<li>{html.escape(r)}</li>" for r in recs) + "\n</ul>" if recs
                else '<p class="muted">No recommendations yet (each GPU set compared needs at least '
                     "2 samples).</p>")
    timeline = _img(lambda b: timeline_plot(spans, gpus, since, until, b), "GPU timeline")
    scaled = " (scaled time)" if time_scale is not None else ""
    simulated = " (simulated)" if any(g.get("simulated") for g in gpus) else ""
    return _page(title, [
        _window(since, until),
        *filter(None, [_provenance(gpus, time_scale)]),
        _section("gpus", "GPUs" + simulated, _gpu_list(gpus)),
        _section("throughput", "Throughput by GPU set" + scaled, table, chart),
        _section("recommendations", "Recommendations", rec_html),
        _section("busy", "GPU busy fraction", _busy_section(busy, gpus)),
        _section("timeline", "Timeline" + scaled, timeline, _span_table(spans, since, until)),
    ])


def timeline_html(spans: Sequence[dict[str, Any]], gpus: Sequence[dict[str, Any]], since: float,
                  until: float, busy: dict[str, float] | None = None, *,
                  title: str = "gpusched timeline") -> str:
    """A self-contained HTML page with the Gantt chart, busy fractions and the span list."""
    timeline = _img(lambda b: timeline_plot(spans, gpus, since, until, b), "GPU timeline")
    body = [_window(since, until),
            _section("timeline", "Timeline", timeline, _span_table(spans, since, until))]
    if busy is not None:
        body.append(_section("busy", "GPU busy fraction", _busy_section(busy, gpus)))
    return _page(title, body)
