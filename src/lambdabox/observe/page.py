"""The timeline as one self-contained HTML page: a section per Init, invoke and shutdown, a row per process, a bar per
phase with its figures on hover; no script and no external asset."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from html import escape

from lambdabox.observe.timeline import (
    LEGEND,
    MOMENTS,
    PLATFORM,
    RUNTIME,
    Section,
    Span,
    figures,
    ms_text,
)

_CSS = """

:root{--ink:#1f2933;--muted:#697586;--line:#e4e7eb;--platform:#64748b;--start:#c4b5fd;--init:#7c3aed;
--function:#2563eb;--response:#0d9488;--work:#38bdf8;--after:#f97316;--error:#dc2626;--shutdown:#a8a29e}
body{font:14px/1.45 system-ui,sans-serif;color:var(--ink);margin:24px auto;max-width:1320px;padding:0 24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0}.sub,.note{color:var(--muted);margin:0 0 14px}
.note{font-size:12px;margin:6px 0 0}table{border-collapse:collapse;margin:0 0 20px;width:100%}
td,th{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left}th{color:var(--muted);font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;color:var(--muted);font-size:12px;margin:0 0 20px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:-2px;margin-right:5px}
section{border:1px solid var(--line);border-radius:8px;padding:14px 16px 10px;margin:0 0 16px}
.head{display:flex;gap:10px;align-items:baseline;flex-wrap:wrap;margin:0 0 8px}.meta{color:var(--muted)}
.tag{font:600 11px/1 ui-monospace,monospace;padding:3px 6px;border-radius:4px;color:#fff;background:var(--platform)}
.tag.init{background:var(--init)}.tag.invoke{background:var(--function)}.tag.bad{background:var(--error)}
.warn{color:var(--error);font-weight:600;margin:0 0 8px}
.chart{display:grid;grid-template-columns:140px 1fr 320px;column-gap:12px;align-items:center}
.name{font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.name small{display:block;font-weight:400;color:var(--muted);font-size:11px}
.figs{font-size:12px;color:var(--muted);font-variant-numeric:tabular-nums}
.track{position:relative;height:30px;border-bottom:1px solid var(--line)}
.axis{position:relative;height:18px;font-size:11px;color:var(--muted)}
.tick{position:absolute;top:0;bottom:0;border-left:1px dashed var(--line)}
.axis span{position:absolute;white-space:nowrap;margin-left:3px}
.bar{position:absolute;top:6px;height:18px;min-width:2px;border-radius:3px;color:#fff;font-size:11px;line-height:18px;
padding:0 5px;box-sizing:border-box;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
.bar:hover,.moment:hover{outline:2px solid var(--ink);z-index:2}
.moment{position:absolute;top:3px;bottom:3px;width:3px;margin-left:-1px;border-radius:1px}
.k-platform{background:var(--platform)}.k-start{background:var(--start);color:#3b0764}.k-init{background:var(--init)}
.k-function{background:var(--function)}.k-response{background:var(--response)}.k-work{background:var(--work)}
.k-after{background:var(--after)}.k-error{background:var(--error)}.k-shutdown{background:var(--shutdown)}
.k-signal{background:#d97706}.k-kill{background:#991b1b}.k-exit{background:var(--ink)}
.k-after.long{background:repeating-linear-gradient(135deg,#dc2626 0 8px,#ef4444 8px 16px);font-weight:700}
"""
_NOTE = (
    "Lambda cannot tell a managed runtime's own start-up from the function's init code: both end when the runtime "
    "first asks for /next, so they are one bar. An extension's init ends at its first /next."
)


def render_html(sections: list[Section], title: str = "lambdabox timeline") -> str:
    """A self-contained page (inline CSS, no script, no external asset): a summary, then one chart per section."""
    t0 = sections[0].start if sections else 0.0
    started = datetime.fromtimestamp(t0, UTC).isoformat(timespec="milliseconds") if sections else "-"
    rows = [
        f"<tr><td>{_heading(s)}</td><td class=n>+{ms_text((s.start - t0) * 1000)} ms</td>"
        f"<td class=n>{ms_text(s.ms)} ms</td>"
        f"<td>{escape(s.status)}</td><td>{'; '.join(_warning(name, ms) for name, ms in s.held_open())}</td></tr>"
        for s in sections
    ]
    legend = "".join(f'<span><i class="k-{k}"></i>{escape(v)}</span>' for k, v in LEGEND.items())
    invokes = sum(s.phase == "invoke" for s in sections)
    return "\n".join(
        [
            f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>",
            f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>",
            f"<p class=sub>{invokes} invoke(s), started {started} UTC. One row per process, one bar per phase; hover "
            "a bar or a mark for its exact figures.</p>",
            f"<div class=legend>{legend}</div>",
            "<table><tr><th>Phase</th><th>Starts</th><th>Duration</th><th>Status</th><th>Notes</th></tr>",
            *rows,
            "</table>",
            *(_html_section(s, t0) for s in sections),
            "</body></html>\n",
        ]
    )


def _heading(section: Section) -> str:
    where = f"{escape(section.environment)}: " if section.environment else ""
    if section.phase == "invoke":
        return f"{where}Invoke {section.number} <code>{escape(section.request_id or '')}</code>"
    return f"{where}{section.phase.capitalize()} ({escape(section.detail)})"


def _warning(name: str, ms: float) -> str:
    return f"{escape(name)} held the invoke open {ms_text(ms)} ms after the response"


def _html_section(section: Section, t0: float) -> str:
    bad = " bad" if section.status != "success" else ""
    meta = [f"{ms_text(section.ms)} ms", escape(section.status), f"at +{ms_text((section.start - t0) * 1000)} ms"]
    if report := section.report:
        meta.append(f"billed {report.get('billedDurationMs')} ms, max memory used {report.get('maxMemoryUsedMB')} MB")
    if runtime_done := [s.end for s in section.spans if s.row == RUNTIME and s.kind == "after"]:
        post_runtime = section.ms - (runtime_done[-1] - section.start) * 1000  # from the runtime's /next to the end
        meta.append(f"post-runtime extensions duration {ms_text(post_runtime)} ms")
    head = (
        f'<div class=head><span class="tag {section.phase}{bad}">{section.phase.upper()}</span>'
        f"<h2>{_heading(section)}</h2><span class=meta>{' · '.join(meta)}</span></div>"
    )
    warnings = "".join(f"<p class=warn>{_warning(name, ms)}</p>" for name, ms in section.held_open())
    total = max(section.ms, 1e-6)
    ticks = _ticks(total)
    grid = "".join(f'<div class=tick style="left:{t / total * 100:.3f}%"></div>' for t in ticks)
    axis = "".join(f'<span style="left:{t / total * 100:.3f}%">{t:g} ms</span>' for t in ticks)
    parts = [head, warnings, f"<div class=chart><div></div><div class=axis>{grid}{axis}</div><div></div>"]
    held = {name for name, _ in section.held_open()}
    for row in section.rows():
        kind = "platform" if row == PLATFORM else "runtime + function" if row == RUNTIME else "extension"
        bars = "".join(_html_span(s, section, row in held) for s in section.spans if s.row == row)
        parts.append(
            f'<div class=name title="{escape(row)}">{escape(row)}<small>{kind}</small></div>'
            f"<div class=track>{grid}{bars}</div><div class=figs>{escape(figures(section, row))}</div>"
        )
    note = f"<p class=note>{_NOTE}</p>" if section.phase == "init" else ""
    return f"<section>{''.join(parts)}</div>{note}</section>"


def _html_span(span: Span, section: Section, long: bool) -> str:
    total = max(section.ms, 1e-6)
    left, start = (span.start - section.start) * 1000 / total * 100, (span.start - section.start) * 1000
    if span.kind in MOMENTS:
        tip = f"{span.row}: {span.label} at +{start:.3f} ms"
        return f'<div class="moment k-{span.kind}" style="left:{left:.3f}%" title="{escape(tip)}"></div>'
    width = span.ms / total * 100
    tip = (
        f"{span.row}: {span.label}\n{span.ms:.3f} ms ({width:.1f}% of the {section.phase})\n"
        f"from +{start:.3f} ms to +{start + span.ms:.3f} ms"
    )
    text = f"{span.label} {ms_text(span.ms)} ms"
    shown = escape(text) if width >= len(text) * 0.75 else ""  # about 0.75% of the track per character
    extra = " long" if long and span.kind == "after" else ""
    return (
        f'<div class="bar k-{span.kind}{extra}" style="left:{left:.3f}%;width:{width:.3f}%" '
        f'title="{escape(tip)}">{shown}</div>'
    )


def _ticks(total_ms: float) -> list[float]:
    """About five round tick positions (1, 2 or 5 times a power of ten) from 0 to ``total_ms``."""
    raw = total_ms / 5
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [round(i * step, 6) for i in range(int(total_ms // step) + 1)]
