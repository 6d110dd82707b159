"""`llm-loadtest report`: one self-contained HTML file describing one run, or several runs
overlaid (one colour per run).

The file needs no network: inline CSS, SVG charts drawn in Python and a few lines of inline
JavaScript that only toggle runs from the legends. It shows the summary per stage; latency
against output throughput across stages (the curve used to pick an operating point); per-stage
TTFT and TPOT distributions computed from ExportRunSamples; the per-second timeline of
throughput, TTFT and errors; the model server's own metrics beside it; the SLOs, checks and
verdict; load generator saturation and, beside it, whether the target kept up; and a per-agent
table. Every user-supplied string is HTML-escaped.

The modules, in the order the data flows:

* `collect`: the run, its result and a digest of its samples, from the controller or `--db`;
* `formatting`: how values read (latencies, times, loads) and how each run is drawn;
* `sections`, `chart_sections`, `server_sections`: the HTML sections, charts drawn by `charts`;
* `assets`: the inline CSS and JavaScript;
* `page`: the complete document;
* `command`: the CLI command.
"""
