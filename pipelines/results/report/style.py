"""The report's stylesheet (inline in the page)."""

CSS = """
:root { --green: #1a9850; --red: #d73027; --ink: #1d232a; --muted: #5f6b76; --line: #e3e7ea; }
* { box-sizing: border-box; }
body { font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       margin: 0; background: #f6f7f8; }
header, main { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 18px; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 0 0 8px; }
h3 { font-size: 14px; margin: 12px 0 4px; color: var(--muted); }
code { font-family: "DejaVu Sans Mono", Menlo, monospace; font-size: 12.5px; }
nav ul { columns: 2; padding-left: 18px; margin: 4px 0 12px; }
nav a { color: #2b5797; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px;
          margin: 14px 0; }
.qtext { font-size: 17px; margin: 4px 0; }
.prompt { color: var(--ink); }
.completion { background: #fff2b3; padding: 0 4px; border-radius: 3px; font-weight: 600; }
.measure, .note { color: var(--muted); margin: 4px 0; }
.figs { display: flex; flex-wrap: wrap; gap: 8px 14px; margin: 8px 0; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-size: 12px; color: var(--muted); }
svg.fig { max-width: 100%; height: auto; width: 340px; }
.legend { display: grid; grid-template-columns: 330px 1fr; gap: 2px 16px; align-items: center;
          margin: 10px 0; font-size: 12px; color: var(--muted); }
.legend p { grid-column: 2; grid-row: 1 / span 2; margin: 0; }
.ramp { height: 12px; border-radius: 3px; border: 1px solid var(--line);
        background: linear-gradient(to right, rgb(215,48,39), #fff 50%, rgb(26,152,80)); }
.ticks { display: flex; justify-content: space-between; font-size: 10.5px; }
details.side { margin: 8px 0; }
details.side > summary { cursor: pointer; font-weight: 600; padding: 4px 0; }
details.top > summary { color: var(--green); }
details.bottom > summary { color: var(--red); }
.row { border-left: 4px solid var(--line); padding: 6px 10px; margin: 6px 0; background: #fcfcfd; }
.row.pro { border-left-color: var(--green); }
.row.con { border-left-color: var(--red); }
.rowhead { display: flex; gap: 12px; align-items: baseline; flex-wrap: wrap; font-size: 12.5px; }
.rank { font-weight: 700; }
.score { font-family: "DejaVu Sans Mono", Menlo, monospace; font-weight: 600; }
.doc { font-family: "DejaVu Sans Mono", Menlo, monospace; }
.meta { color: var(--muted); }
.text { white-space: pre-wrap; word-break: break-word; margin-top: 4px; font-size: 14px; line-height: 1.75; }
.tok { border-radius: 2px; padding: 1px 0; }
.cols { display: grid; grid-template-columns: repeat(3, 1fr); gap: 18px; }
table.kv { border-collapse: collapse; font-size: 12px; width: 100%; }
table.kv th { text-align: left; color: var(--muted); font-weight: 500; padding: 2px 8px 2px 0; vertical-align: top;
              white-space: nowrap; }
table.kv td { padding: 2px 0; word-break: break-all; }
.health { border-left: 4px solid var(--green); background: #fff; padding: 6px 10px; margin: 8px 0; }
.health.loose { border-left-color: #e08a00; background: #fff8e6; }
"""
