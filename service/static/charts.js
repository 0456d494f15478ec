// Small SVG charts drawn from report JSON: no library, no network, no inline styles (the CSP
// forbids them), text set with textContent only.

const NS = "http://www.w3.org/2000/svg";

export function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

// 1-2-5 ticks covering [lo, hi].
export function niceTicks(lo, hi, count = 5) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (lo === hi) {
    const pad = Math.abs(lo) * 0.01 || 1;
    lo -= pad;
    hi += pad;
  }
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Number(v.toPrecision(12)));
  }
  if (ticks[0] > lo) ticks.unshift(ticks[0] - step);
  if (ticks[ticks.length - 1] < hi) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
  return ticks;
}

function formatTick(value, ticks) {
  const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : 1;
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step))));
  return value.toFixed(decimals);
}

const PAD = { left: 56, right: 12, top: 10, bottom: 34 };

function frame(width, height, yTicks, label) {
  const svg = svgEl("svg", {
    class: "chart",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": label,
  });
  svg.append(svgEl("title", {}, label));
  const lo = yTicks[0];
  const hi = yTicks[yTicks.length - 1];
  const plotH = height - PAD.top - PAD.bottom;
  const y = (v) => PAD.top + plotH - ((v - lo) / (hi - lo || 1)) * plotH;
  const grid = svgEl("g", { class: "grid" });
  const axis = svgEl("g", { class: "axis" });
  for (const t of yTicks) {
    grid.append(svgEl("line", { x1: PAD.left, x2: width - PAD.right, y1: y(t), y2: y(t) }));
    axis.append(svgEl("text", { x: PAD.left - 6, y: y(t) + 4, "text-anchor": "end" }, formatTick(t, yTicks)));
  }
  axis.append(
    svgEl("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: height - PAD.bottom }),
    svgEl("line", {
      x1: PAD.left,
      x2: width - PAD.right,
      y1: height - PAD.bottom,
      y2: height - PAD.bottom,
    }),
  );
  svg.append(grid, axis);
  return { svg, y, axis };
}

function extent(values) {
  const finite = values.filter((v) => Number.isFinite(v));
  return finite.length ? [Math.min(...finite), Math.max(...finite)] : [0, 1];
}

/**
 * Points per layer (or step): series = [{name, cls, points: [{x, y, title}]}].
 * highlight: x values drawn as a band and with `replaced` marks. marks: one circle per point.
 */
export function lineChart({
  series,
  label,
  xLabel,
  highlight = [],
  marks = true,
  width = 560,
  height = 220,
  chartId,
}) {
  const all = series.flatMap((s) => s.points);
  const [yMin, yMax] = extent(all.map((p) => p.y));
  const yTicks = niceTicks(yMin, yMax, 4);
  const { svg, y, axis } = frame(width, height, yTicks, label);
  if (chartId) svg.setAttribute("data-chart", chartId);
  const [xMin, xMax] = extent(all.map((p) => p.x));
  const plotW = width - PAD.left - PAD.right;
  const half = xMax > xMin ? plotW / (xMax - xMin + 1) / 2 : plotW / 2;
  const x = (v) => PAD.left + half + (xMax > xMin ? ((v - xMin) / (xMax - xMin)) * (plotW - 2 * half) : 0);
  const highlighted = new Set(highlight);
  const bands = svgEl("g", { class: "bands" });
  for (const h of highlighted) {
    bands.append(
      svgEl("rect", {
        class: "band",
        x: x(h) - half,
        y: PAD.top,
        width: 2 * half,
        height: height - PAD.top - PAD.bottom,
      }),
    );
  }
  svg.insertBefore(bands, axis);
  const xs = [...new Set(all.map((p) => p.x))].sort((a, b) => a - b);
  const every = Math.max(1, Math.ceil(xs.length / 16));
  xs.forEach((v, i) => {
    if (i % every === 0) {
      axis.append(
        svgEl("text", { x: x(v), y: height - PAD.bottom + 14, "text-anchor": "middle" }, String(v)),
      );
    }
  });
  if (xLabel) {
    axis.append(svgEl("text", { x: PAD.left + plotW / 2, y: height - 4, "text-anchor": "middle" }, xLabel));
  }
  series.forEach((s, index) => {
    const cls = s.cls || `c${index}`;
    const pts = s.points.filter((p) => Number.isFinite(p.y));
    if (pts.length > 1) {
      const d = pts.map((p, i) => `${i ? "L" : "M"}${x(p.x).toFixed(1)},${y(p.y).toFixed(1)}`).join("");
      svg.append(svgEl("path", { class: `series ${cls}`, d }));
    }
    if (!marks) return;
    const group = svgEl("g", { class: "marks", "data-series": s.name });
    for (const p of pts) {
      const replaced = highlighted.has(p.x);
      const circle = svgEl("circle", {
        class: `mark ${cls}${replaced ? " replaced" : ""}`,
        cx: x(p.x).toFixed(1),
        cy: y(p.y).toFixed(1),
        r: replaced ? 5 : 3.5,
        "data-x": p.x,
      });
      circle.append(svgEl("title", {}, p.title ?? `${p.x}: ${p.y}`));
      group.append(circle);
    }
    svg.append(group);
  });
  return svg;
}

/** Horizontal bars: bars = [{label, value, cls, text}], ref = {value, label}. */
export function barChart({ bars, label, reference, width = 560, chartId }) {
  const rowH = 30;
  const height = PAD.top + bars.length * rowH + 24;
  const left = 150;
  const values = bars.map((b) => b.value).concat(reference ? [reference.value] : []);
  const max = Math.max(...values.filter(Number.isFinite)) * 1.12 || 1;
  const plotW = width - left - 16;
  const svg = svgEl("svg", {
    class: "chart",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": label,
  });
  if (chartId) svg.setAttribute("data-chart", chartId);
  svg.append(svgEl("title", {}, label));
  const x = (v) => left + (v / max) * plotW;
  bars.forEach((bar, i) => {
    const top = PAD.top + i * rowH;
    svg.append(svgEl("text", { x: left - 8, y: top + 17, "text-anchor": "end" }, bar.label));
    if (!Number.isFinite(bar.value)) return;
    const rect = svgEl("rect", {
      class: bar.cls || "c0",
      x: left,
      y: top + 4,
      width: Math.max(1, x(bar.value) - left),
      height: rowH - 10,
      rx: 3,
    });
    rect.append(svgEl("title", {}, `${bar.label}: ${bar.text ?? bar.value}`));
    svg.append(
      rect,
      svgEl("text", { class: "bar-label", x: x(bar.value) + 6, y: top + 18 }, bar.text ?? String(bar.value)),
    );
  });
  if (reference && Number.isFinite(reference.value)) {
    const rx = x(reference.value);
    svg.append(
      svgEl("line", { class: "ref", x1: rx, x2: rx, y1: PAD.top, y2: height - 20 }),
      svgEl("text", { x: rx, y: height - 6, "text-anchor": "middle" }, reference.label),
    );
  }
  return svg;
}
