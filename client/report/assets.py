"""The report's inline CSS and JavaScript: the file must show everything with no network, and
its only script toggles runs from the legends."""

from __future__ import annotations

from collections.abc import Sequence

from client.report.formatting import RunStyle

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#e4e7eb;--bg:#f5f6f8;--card:#fff}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1400px;margin:0 auto;padding:24px 20px 40px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:0 0 12px}h3{font-size:14px;margin:0 0 6px}
.sub,.note{color:var(--muted);font-size:12.5px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f0f2f5;padding:1px 4px;
  border-radius:4px;word-break:break-all}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin:0 0 18px}
.run-cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(380px,100%),1fr));gap:14px;margin:14px 0 18px}
.run-card{background:var(--card);border:1px solid var(--line);border-top:4px solid;border-radius:10px;
  padding:12px 16px}
.run-title{display:flex;align-items:center;gap:8px;flex-wrap:wrap;margin-bottom:6px;font-size:15px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;flex:none}
.kv{border-collapse:collapse;font-size:13px}.kv th{color:var(--muted);font-weight:500;text-align:left;
  padding:2px 14px 2px 0;vertical-align:top;white-space:nowrap}.kv td{padding:2px 0}
.label{display:inline-block;background:#eef1f5;border-radius:10px;padding:0 8px;margin:6px 4px 0 0;font-size:12px}
.state,.badge{font-size:11.5px;font-weight:600;border-radius:10px;padding:1px 9px;background:#eef0f3;color:#444}
.state-succeeded{background:#dafbe1;color:#116329}.state-failed,.state-interrupted{background:#ffebe9;color:#a40e26}
.state-cancelled{background:#fff8c5;color:#7d4e00}
.verdict-pass{background:#dafbe1;color:#116329}.verdict-fail{background:#ffebe9;color:#a40e26}
.badge.big{font-size:13px;padding:2px 12px}
.verdict-line{display:flex;align-items:center;gap:10px;margin:6px 0 10px;flex-wrap:wrap}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(440px,100%),1fr));gap:14px;margin-bottom:8px}
figure.chart{margin:0;border:1px solid #edf0f3;border-radius:8px;padding:10px 12px 8px;min-width:0}
figure.chart > svg{display:block;width:100%;height:auto}
figcaption{color:var(--muted);font-size:12px;margin-top:4px}
.no-data{display:flex;align-items:center;justify-content:center;min-height:180px;color:var(--muted);
  background:repeating-linear-gradient(45deg,#fafbfc,#fafbfc 8px,#f3f5f7 8px,#f3f5f7 16px);border-radius:6px;
  font-size:13px;text-align:center;padding:12px}
svg text{font-size:11px;fill:#59636e}svg .axis-label{font-size:12px;fill:#3d444d}
svg .grid{stroke:#eceff2}svg .axis,svg .tick-mark{stroke:#a3aab2}
svg .line{fill:none;stroke-width:2;stroke-linejoin:round}svg .area{opacity:.16}
svg .error-bars line{stroke-width:1.2;opacity:.7}
.ci{font-size:11px;color:#8a929b;white-space:nowrap}
svg .band{fill:#f2f4f7}svg .band-label{font-size:10.5px;fill:#8a929b}
svg .marker line{stroke-width:1.5}svg .marker-label{font-size:10.5px}
svg .point-label{font-size:10.5px;fill:#3d444d}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:#3d444d;margin-top:4px}
.legend-item{display:inline-flex;align-items:center;gap:5px;white-space:nowrap}.legend-item[data-toggle]{cursor:pointer}
.legend-item svg{display:inline-block;flex:none}
.table-wrap{overflow-x:auto;margin-bottom:10px}
table.data{border-collapse:collapse;width:100%;font-size:12.5px;font-variant-numeric:tabular-nums}
table.data th{font-weight:600;color:#3d444d;background:#f6f8fa;white-space:nowrap}
table.data th,table.data td{padding:5px 7px;border-bottom:1px solid #eef0f3;text-align:right}
table.data .l{text-align:left}table.data tbody tr:hover{background:#fafbfc}
td.bad{color:#a40e26;font-weight:600}
.checks tr.pass .result{color:#116329;font-weight:600}.checks tr.fail .result{color:#a40e26;font-weight:600}
.checks tr.fail{background:#fff5f5}
.warn{background:#fff8c5;border:1px solid #e9c46a;border-radius:6px;padding:8px 12px;margin:0 0 8px}
.ok-note{color:#116329}
.run-heading,.stage-heading{display:flex;align-items:center;gap:8px;margin:14px 0 8px}
footer{color:var(--muted);font-size:12px;text-align:center}
@media print{body{background:#fff}section{break-inside:avoid}}
"""

# Clicking a legend entry hides that run everywhere (several runs overlaid).
SCRIPT = """
document.addEventListener("click", function (event) {
  var item = event.target.closest ? event.target.closest("[data-toggle]") : null;
  if (!item) { return; }
  document.body.classList.toggle("hide-" + item.getAttribute("data-toggle"));
});
"""


def toggle_css(styles: Sequence[RunStyle]) -> str:
    """The rules that hide a run whose legend entry was clicked (the script sets the class)."""
    return "".join(
        f'.hide-{s.group} .{s.group}{{display:none}}.hide-{s.group} [data-toggle="{s.group}"]{{opacity:.35}}'
        for s in styles
    )
