"""Plain-text rendering for the CLI (no rich here: the common commands must start fast)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

# C0 controls, DEL, C1 controls (a lone 0x9b is CSI on many terminals), and the Unicode format
# characters that reorder or hide text (bidi overrides, zero-width joiners, BOM)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e"
                     "\u2060-\u206f\ufeff\ufff9-\ufffb]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group(0)
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xff else f"\\u{code:04x}"


def safe(value: Any) -> str:
    """Text from the daemon (job names, commands, reasons, other users' strings) made safe for
    a terminal: control characters become visible escapes (ESC as \\x1b, CR as \\r), so
    nothing another user chose can move the cursor, clear the screen or set the title."""
    text = "" if value is None else str(value)
    return _UNSAFE.sub(_escape_char, text)


def safe_log(text: str) -> str:
    """``safe`` for a log shown to someone else: lines and tabs stay, every other control
    character is escaped."""
    return "\n".join("\t".join(safe(part) for part in line.split("\t"))
                     for line in text.split("\n"))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[safe(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def emit_json(data: Any) -> None:
    sys.stdout.write(json_text(data))


def ago(ts: str | None, now: datetime | None = None) -> str:
    if not ts:
        return ""
    t = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    secs = int(((now or datetime.now(UTC)) - t).total_seconds())
    return duration(secs) + " ago" if secs >= 0 else ts


def duration(secs: float | None) -> str:
    if secs is None:
        return ""
    secs = round(secs)
    if secs < 60:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02d}s"
    if secs < 86400:
        return f"{secs // 3600}h{secs % 3600 // 60:02d}m"
    return f"{secs // 86400}d{secs % 86400 // 3600:02d}h"


def mib(v: int | None) -> str:
    if v is None:
        return ""
    return f"{v / 1024:.1f}G" if v >= 1024 else f"{v}M"


def gpus_table(gpus: list[dict[str, Any]]) -> str:
    rows = []
    for g in gpus:
        foreign = [p for p in g.get("processes", []) if p.get("foreign")]
        state = g["state"] + (f" (job {g['job_id']})" if g.get("job_id") else "")
        if g.get("drain_reason"):
            state += f": {g['drain_reason']}"
        rows.append([g["index"], g["name"] + (" [sim]" if g.get("simulated") else ""),
                     f"{mib(g['memory_used_mib'])}/{mib(g['memory_total_mib'])}",
                     "" if g.get("utilization_pct") is None else f"{g['utilization_pct']}%",
                     "" if g.get("temperature_c") is None else f"{g['temperature_c']}C",
                     len(foreign) or "", state, g["uuid"]])
    return table(["IDX", "NAME", "MEMORY", "UTIL", "TEMP", "FOREIGN", "STATE", "UUID"], rows)


def cluster_table(nodes: list[dict[str, Any]]) -> str:
    """Slurm's nodes with their GPUs (gres) and those in use."""
    return table(["NODE", "STATE", "GPUS", "IN USE", "PARTITIONS"],
                 [[safe(n["node"]), safe(n["state"]), safe(n["gres"]) or "-",
                   safe(n["gres_used"]) or "-", safe(n["partitions"])] for n in nodes])


def jobs_table(jobs: list[dict[str, Any]]) -> str:
    rows = []
    for j in jobs:
        gpus = ",".join(str(i) for i in j.get("gpu_indices") or []) or (
            "-" if j["status"] not in ("queued", "held") else _want(j["request"]))
        cmd = ("(hidden)" if j.get("redacted") and not j.get("command")
               else safe(" ".join(j.get("command") or [])))
        rows.append([j["id"], short_name(safe(j.get("name"))), j["status"], gpus, j["owner"],
                     ago(j["submitted_at"]), progress_text(j.get("progress")) or _waits(j)
                     or _outcome(j),
                     cmd[:50] + ("…" if len(cmd) > 50 else "")])
    return table(["ID", "NAME", "STATUS", "GPUS", "OWNER", "SUBMITTED", "PROGRESS/RESULT",
                  "COMMAND"], rows)


NAME_WIDTH = 40


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """A job name cut to ``width`` without losing what tells names apart: a pipeline stage's
    name (``ssd_resnet18_kitti/retrain[threshold=0.2]``) keeps its stage and branch whole and
    gives up the start of the pipeline's name (``ssd_re…/retrain[threshold=0.2]``); other
    names keep their start and their end."""
    if len(name) <= width:
        return name
    prefix, sep, stage = name.partition("/")
    if sep and len(stage) + 2 <= width:
        room = width - len(stage) - 2
        return (prefix[:room] + "…/" if room else "…/") + stage
    keep = width - 1
    return name[:keep - keep // 2] + "…" + name[len(name) - keep // 2:]


def progress_text(p: dict[str, Any] | None) -> str:
    """'epoch 35/80, 48 s/epoch, ETA 36m00s' for a running stage that reports epochs."""
    if not p:
        return ""
    text = f"epoch {p['epoch']}" + (f"/{p['max_epoch']}" if p.get("max_epoch") else "")
    if p.get("s_per_epoch"):
        secs = p["s_per_epoch"]
        text += f", {secs:.0f} s/epoch" if secs >= 10 else f", {secs:.2g} s/epoch"
    if p.get("eta_s") is not None:
        text += f", ETA {duration(p['eta_s'])}"
    return text


def _want(req: dict[str, Any]) -> str:
    text = ",".join(req["ids"]) if req.get("ids") else f"any {req['count']}"
    if req.get("gpu_type"):
        text += f" {req['gpu_type']}"
    return f"({text})"


def _waits(j: dict[str, Any], width: int = 60) -> str:
    """Why a queued job waits, cut for a table (``show`` has it whole)."""
    why = j.get("waiting_reason") if j["status"] == "queued" else None
    if not why:
        return ""
    return why if len(why) <= width else why[:width - 1] + "…"


def _outcome(j: dict[str, Any]) -> str:
    if j["status"] in ("succeeded", "failed", "cancelled", "lost"):
        return j.get("reason") or (f"exit {j['exit_code']}" if j["exit_code"] is not None else "")
    return j.get("reason") or ""


def job_detail(j: dict[str, Any]) -> str:
    lines = [f"job {j['id']}" + (f" ({safe(j['name'])})" if j.get("name") else "")
             + f": {safe(j['status'])}"]
    command = ("(hidden: not your job)" if j.get("redacted") and not j.get("command")
               else " ".join(j.get("command") or []))
    ran = next((a.get("command") for a in reversed(j.get("attempts") or [])
                if a.get("n") == j.get("attempt")), None)
    ran_as = " ".join(json.loads(ran)) if ran else None  # chosen at launch (TAO's --gpu_index)
    field = [("owner", j["owner"]), ("command", command), ("ran as", ran_as),
             ("runner", j["runner"]), ("gpus wanted", _want(j["request"]).strip("()")),
             ("gpus", ", ".join(f"{i} ({u})" for i, u in zip(j.get("gpu_indices") or [],
                                                             j["gpus"], strict=False))),
             ("priority", j["priority"]), ("after", ", ".join(map(str, j["after"]))),
             ("attempt", j["attempt"]), ("exit code", j["exit_code"]), ("reason", j["reason"]),
             ("waiting", j.get("waiting_reason")), ("progress", progress_text(j.get("progress"))),
             ("submitted", j["submitted_at"]),
             ("started", j["started_at"]), ("ended", j["ended_at"]), ("log", j.get("log_path"))]
    for k, v in field:
        if v not in (None, "", []):
            lines.append(f"  {k + ':':<13}{safe(v)}")
    if j.get("artifacts"):
        lines.append("  artifacts:")
        lines += ["    " + ln for ln in artifacts_table(j["artifacts"]).splitlines()]
    if j.get("events"):
        lines.append("  events:")
        for e in j["events"]:
            lines.append(f"    {e['at']}  {safe(e['from_status'] or '-'):>9} -> "
                         f"{safe(e['to_status']):<9}  {safe(e['actor'])}"
                         + (f": {safe(e['reason'])}" if e.get("reason") else ""))
    return "\n".join(lines)


def artifacts_table(arts: list[dict[str, Any]]) -> str:
    rows = []
    for a in arts:
        m = a.get("metrics") or {}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in m.items() if k != "ap")
        rows.append([a["kind"], "" if a.get("epoch") is None else a["epoch"], a.get("path") or "",
                     shown])
    return table(["KIND", "EPOCH", "PATH", "METRICS"], rows)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def pipeline_summary(summary: dict[str, Any]) -> str:
    """The gate's table: threshold, size, mAP, drop, s/epoch per branch, and the result."""
    base = summary["baseline_map"]
    rows = []
    for b in summary["branches"]:
        rows.append([f"{b['threshold']:g}" if b["threshold"] is not None else "-",
                     b["round"], "" if b["size_mib"] is None else f"{b['size_mib']:.1f}",
                     "" if b["map"] is None else f"{b['map']:.4f}",
                     "" if b["drop"] is None else f"{b['drop'] * 100:.2f}",
                     _s_per_epoch(b), _gate_cell(b)])
    out = [f"unpruned mAP {base:.4f}",
           table(["THRESHOLD", "ROUND", "SIZE MiB", "mAP", "DROP (pts)", "S/EPOCH", "GATE"],
                 rows)]
    best = summary.get("result")
    if best:
        out.append(f"result: the pruned model at threshold {best['threshold']:g}, "
                   f"{best['size_mib']:.1f} MiB, mAP {best['map']:.4f} "
                   f"({abs(best['drop']) * 100:.2f} points "
                   f"{'below' if best['drop'] >= 0 else 'above'} the unpruned model)")
        if best.get("model"):
            out.append(f"model: {safe(best['model'])}")
    return "\n".join(out)


def _s_per_epoch(b: dict[str, Any]) -> str:
    """'41.2 (RTX 2070)': the branch's training speed and the GPU set it was measured on."""
    if b["s_per_epoch"] is None:
        return ""
    return f"{b['s_per_epoch']:.3g}" + (f" ({b['gpus']})" if b.get("gpus") else "")


GATE_CELL = 90


def _gate_cell(b: dict[str, Any]) -> str:
    """pass, fail (judged and too far below), or the stage that failed and why."""
    if b["passed"]:
        return "pass"
    if b["status"] == "succeeded":
        return "fail"
    text = b["status"]
    return text if len(text) <= GATE_CELL else text[:GATE_CELL - 1] + "…"


def pipeline_detail(p: dict[str, Any]) -> str:
    lines = [f"pipeline {p['id']} ({safe(p['name'])}): {safe(p['status'])}"
             + (f", round {p['rounds']}" if p["rounds"] > 1 else "")
             + (f" - {safe(p['reason'])}" if p.get("reason") else "")]
    rows = []
    for j in p.get("jobs", []):
        prog = j.get("progress") or {}
        where = (f"epoch {prog['epoch']}/{prog['max_epoch']}" if prog.get("max_epoch") else "")
        rows.append([j["id"], safe(j["name"]).split("/", 1)[-1], j["status"],
                     ",".join(map(str, j["gpu_indices"])) or "-", where,
                     safe(j.get("reason"))[:60]])
    lines.append(table(["JOB", "STAGE", "STATUS", "GPUS", "PROGRESS", "REASON"], rows))
    if p.get("summary"):
        lines.append("")
        lines.append(pipeline_summary(p["summary"]))
    return "\n".join(lines)


def pipeline_model(p: dict[str, Any]) -> tuple[str | None, str]:
    """The file a pipeline chose (its summary's ``model``), or None and why there is none."""
    who = f"pipeline {p['id']} ({safe(p['name'])})"
    if p.get("redacted"):
        return None, f"{who} is not yours: its result is hidden"
    if p["status"] == "running":
        return None, (f"{who} is still running" + (f" (round {p['rounds']})"
                                                  if p["rounds"] > 1 else "")
                      + f": no result yet; see `gpusched pipeline status {p['id']}`")
    summary = p.get("summary") or {}
    if p["status"] != "succeeded":
        return None, f"{who} {safe(p['status'])}: {safe(p.get('reason') or 'no reason given')}"
    if not summary:
        return None, (f"{who} has no gate, so it chose no model; see the stages' artifacts "
                      f"in `gpusched pipeline status {p['id']}`")
    best = summary.get("result")
    if not best:
        return None, f"{who}: no branch passed the gate"
    model = summary.get("model") or best.get("model")
    if not model:
        return None, (f"{who}: the chosen branch (threshold {best['threshold']:g}) recorded "
                      "no checkpoint to deploy")
    return str(model), ""


def tick_line(tick: dict[str, Any]) -> str:
    """``health``'s tick figures in one line: how long the daemon's ticks take and which steps
    take the most of its time since it started ("" before its first timed tick)."""
    if "median_ms" not in tick:
        return ""
    steps = {k: v for k, v in (tick.get("seconds_by_step") or {}).items() if "." not in k}
    total = sum(steps.values())
    top = sorted(steps.items(), key=lambda kv: -kv[1])[:3]
    by = ", ".join(f"{safe(k)} {100 * v / total:.0f}%" for k, v in top if v > 0) \
        if total > 0 else ""
    return (f"median {tick['median_ms']:.1f} ms, p95 {tick['p95_ms']:.1f} ms over the last "
            f"{tick['over_last']} of {tick['ticks']} ticks"
            + (f"; time by step: {by}" if by else ""))
