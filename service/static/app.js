// The linearize dashboard: a few pages over the /v1 API. The API key lives in sessionStorage
// (this tab only) and goes out as the Bearer header; it never enters a URL or a cookie.
// Every value from the API is put into the page with textContent (the h() helper), never as
// HTML, so metadata, file names, model ids and token strings show as text.

import { barChart, lineChart } from "/ui/assets/charts.js";

const KEY_ITEM = "linearize.apiKey";
const PAGE_SIZE = 20;
const LIST_REFRESH_MS = 3000; // the jobs list re-reads its page this often while a job is live
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelling", "cancelled"];
const LINEARITY_METRICS = [
  ["score", "paper score"],
  ["score_without_residual", "score without residual"],
  ["anisotropy", "anisotropy"],
  ["intrinsic_dimension", "intrinsic dimension (TwoNN)"],
];
const main = () => document.getElementById("main");
let pageController = null; // aborts the previous page's requests and streams on navigation
const reportCache = new Map();

// --- DOM -------------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "on") for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function show(...nodes) {
  main().replaceChildren(...nodes);
}

const link = (href, text, attrs = {}) => h("a", { href, "data-nav": true, ...attrs }, text);
const badge = (text, cls = text) => h("span", { class: `badge ${cls}` }, text);
const statusBadge = (status) => h("span", { class: `badge ${status}`, id: "job-status" }, status);
const table = (head, rows, attrs = {}) =>
  h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      attrs,
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          head.map((c) => h("th", { class: c.num ? "num" : null }, c.label ?? c)),
        ),
      ),
      h("tbody", {}, rows),
    ),
  );

// --- formatting ------------------------------------------------------------------------------

const fmt = (v, digits = 2) =>
  v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits);
const pct = (v) => (v === null || v === undefined ? "–" : `${v >= 0 ? "+" : ""}${Number(v).toFixed(2)} %`);

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function age(iso) {
  if (!iso) return "–";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

const millions = (n) => `${(n / 1e6).toPrecision(3)}M`;
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

function budgetText(spec) {
  if (spec.kind !== "compress") return "–";
  if (spec.layers === "max") return "max (gated search)";
  if (spec.layers != null) return `${spec.layers} layer${spec.layers === 1 ? "" : "s"}`;
  if (spec.indices != null) return `layers ${spec.indices.join(", ")}`;
  if (spec.target_ppl_increase != null) return `≤ ${spec.target_ppl_increase} % ppl`;
  return "–";
}

const modelText = (spec) => (spec.kind === "compare" ? spec.models.join(" vs ") : spec.model);

// --- API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

const apiKey = () => sessionStorage.getItem(KEY_ITEM);

async function request(path, { method = "GET", json, body, key = apiKey(), signal } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
  if (response.status === 401 && key === apiKey()) {
    signOut("The API key was refused (401). Sign in again.");
    throw new ApiError(401, "missing or invalid API key");
  }
  return response;
}

async function api(path, options = {}) {
  const response = await request(path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data?.detail ?? response.statusText);
  return data;
}

async function report(jobId, signal) {
  if (!reportCache.has(jobId))
    reportCache.set(jobId, await api(`/v1/jobs/${encodeURIComponent(jobId)}/report`, { signal }));
  return reportCache.get(jobId);
}

// All events of a finished job, page by page (the API's cursor).
async function allEvents(jobId, signal) {
  const items = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ limit: "1000" });
    if (after !== null) query.set("after", after);
    const page = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events?${query}`, { signal });
    items.push(...page.items);
    if (page.items.length < 1000) return items;
    after = page.next_cursor;
  }
}

// Server-Sent Events over fetch: EventSource cannot send an Authorization header. Resumes
// after a dropped connection (from the last event id) until the job is terminal.
async function followEvents(jobId, after, onEvent, signal) {
  let lastId = after;
  for (let attempt = 0; !signal.aborted; attempt += 1) {
    try {
      const query = new URLSearchParams({ stream: "true" });
      if (lastId !== null) query.set("after", lastId);
      const response = await request(`/v1/jobs/${encodeURIComponent(jobId)}/events?${query}`, { signal });
      if (!response.ok) throw new ApiError(response.status, response.statusText);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const dataLine = block.split("\n").find((line) => line.startsWith("data: "));
          if (!dataLine) continue; // keep-alive comment
          const event = JSON.parse(dataLine.slice(6));
          lastId = event.id;
          onEvent(event);
          if (event.type === "status" && TERMINAL.has(event.status)) return;
        }
      }
    } catch (error) {
      if (signal.aborted || error.status === 401 || error.status === 404) return;
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(5000, 500 * (attempt + 1))));
    const job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal }).catch(() => null);
    if (job && TERMINAL.has(job.status)) return;
  }
}

// --- navigation ------------------------------------------------------------------------------

function navigate(href, replace = false) {
  if (replace) history.replaceState(null, "", href);
  else history.pushState(null, "", href);
  render();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_ITEM);
  sessionStorage.setItem("linearize.signinMessage", message || "");
  navigate("/ui/signin", true);
}

function render() {
  pageController?.abort();
  pageController = new AbortController();
  const signal = pageController.signal;
  const path = location.pathname.replace(/\/+$/, "") || "/ui";
  const params = new URLSearchParams(location.search);
  const signedIn = Boolean(apiKey());
  document.getElementById("nav").hidden = !signedIn;
  if (!signedIn && path !== "/ui/signin") return navigate("/ui/signin", true);
  window.scrollTo(0, 0);
  let page;
  if (path === "/ui/signin") page = signInPage();
  else if (path === "/ui" || path === "/ui/jobs") page = jobsPage(params, signal);
  else if (path === "/ui/submit") page = submitPage(signal);
  else if (path === "/ui/compare") page = comparePage(params, signal);
  else if (path.startsWith("/ui/jobs/")) page = jobPage(decodeURIComponent(path.slice(9)), signal);
  else page = Promise.resolve(show(h("h1", {}, "Page not found")));
  Promise.resolve(page).catch((error) => {
    if (signal.aborted || error.status === 401) return;
    show(h("h1", {}, "Something went wrong"), h("p", { class: "banner" }, errorText(error)));
  });
}

function errorText(error) {
  if (error instanceof ApiError) {
    if (Array.isArray(error.detail)) return error.detail.map((d) => d.msg).join("; ");
    return `${error.message} (HTTP ${error.status})`;
  }
  return String(error.message || error);
}

// --- sign-in ---------------------------------------------------------------------------------

function signInPage() {
  const message = sessionStorage.getItem("linearize.signinMessage");
  sessionStorage.removeItem("linearize.signinMessage");
  const input = h("input", {
    type: "password",
    id: "api-key",
    name: "api-key",
    autocomplete: "off",
    required: true,
  });
  const feedback = h("p", { id: "signin-error", class: "banner", hidden: !message }, message || "");
  const form = h(
    "form",
    { class: "card", id: "signin-form" },
    h(
      "div",
      { class: "field" },
      h("label", { for: "api-key" }, "API key"),
      input,
      h("p", { class: "hint" }, "Kept in this browser tab only (sessionStorage); sent as the Bearer header."),
    ),
    feedback,
    h("button", { class: "primary", type: "submit" }, "Sign in"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    feedback.hidden = true;
    try {
      const response = await request("/v1/jobs?limit=1", { key });
      if (response.status === 401) {
        feedback.textContent =
          "This API key was not accepted. Check that it is complete and belongs to this service.";
        feedback.hidden = false;
        return;
      }
      if (!response.ok) throw new ApiError(response.status, response.statusText);
      sessionStorage.setItem(KEY_ITEM, key);
      navigate("/ui/jobs");
    } catch (error) {
      feedback.textContent = `The service did not answer: ${errorText(error)}`;
      feedback.hidden = false;
    }
  });
  show(h("h1", {}, "Sign in"), form);
  input.focus();
}

// --- jobs list -------------------------------------------------------------------------------

async function jobsPage(params, signal) {
  const status = params.get("status") || "";
  const after = params.get("after");
  const limit = Number(params.get("limit")) || PAGE_SIZE;
  const query = new URLSearchParams({ limit: String(limit) });
  if (status) query.set("status", status);
  if (after) query.set("after", after);
  const filter = h(
    "select",
    { id: "status-filter", "aria-label": "Filter by status" },
    h("option", { value: "" }, "all statuses"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)),
  );
  filter.addEventListener("change", () => {
    const next = new URLSearchParams();
    if (filter.value) next.set("status", filter.value);
    if (params.get("limit")) next.set("limit", params.get("limit"));
    navigate(`/ui/jobs${next.size ? `?${next}` : ""}`);
  });
  const body = h("tbody");
  const pager = h("div", { class: "toolbar" });
  show(
    h("div", { class: "toolbar" }, h("h1", {}, "Jobs"), filter, link("/ui/submit", "Submit a job")),
    h(
      "div",
      { class: "card" },
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { id: "jobs-table" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["status", "job", "kind", "model", "budget", "replaced", "ppl increase", "gate", "age"].map(
                (c) => h("th", {}, c),
              ),
            ),
          ),
          body,
        ),
      ),
      pager,
    ),
  );
  const url = `/v1/jobs?${query}`;
  const page = await api(url, { signal });
  const draw = (shown) => showJobs(body, pager, shown, query, params, signal);
  draw(page);
  await refreshWhileLive(url, page, draw, signal);
}

// While a shown job is queued or running, the same page (filter and cursor) is read again.
async function refreshWhileLive(url, page, draw, signal) {
  while (page.items.some((job) => !TERMINAL.has(job.status))) {
    await untilRefresh(signal);
    if (signal.aborted) return;
    // A failed read keeps the rows shown and tries again; leaving the page ends the loop.
    const fresh = await api(url, { signal }).catch(() => (signal.aborted ? null : page));
    if (!fresh) return;
    if (fresh !== page) draw(fresh);
    page = fresh;
  }
}

// Rows whose status did not change are kept (not rebuilt), so a refresh neither flickers nor
// moves the scroll position; only their age is brought up to date.
function showJobs(body, pager, page, query, params, signal) {
  const shown = new Map([...body.querySelectorAll("tr[data-job]")].map((row) => [row.dataset.job, row]));
  const rows = page.items.map((job) => {
    const row = shown.get(job.id);
    if (!row || row.dataset.status !== job.status) return jobRow(job, signal);
    row.lastElementChild.textContent = age(job.created_at);
    return row;
  });
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No jobs.")));
  body.replaceChildren(...rows);
  pager.replaceChildren();
  if (params.get("after"))
    pager.append(
      h("button", { class: "secondary", type: "button", on: { click: () => history.back() } }, "‹ Newer"),
    );
  if (page.next_cursor) {
    const next = new URLSearchParams(query);
    next.set("after", page.next_cursor);
    if (!params.get("limit")) next.delete("limit");
    pager.append(link(`/ui/jobs?${next}`, "Older ›", { id: "older", class: "button" }));
  }
}

// Resolves after LIST_REFRESH_MS of the tab being visible (a hidden tab does not poll), or at
// once when the page is left.
function untilRefresh(signal) {
  return new Promise((resolve) => {
    let timer = null;
    const done = () => {
      clearTimeout(timer);
      document.removeEventListener("visibilitychange", onVisibility);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const onVisibility = () => {
      clearTimeout(timer);
      if (!document.hidden) timer = setTimeout(done, LIST_REFRESH_MS);
    };
    if (signal.aborted) return resolve();
    document.addEventListener("visibilitychange", onVisibility);
    signal.addEventListener("abort", done);
    onVisibility();
  });
}

function jobRow(job, signal) {
  const replaced = h("td", {}, "–");
  const increase = h("td", { class: "num" }, "–");
  const gate = h("td", {}, "–");
  const row = h(
    "tr",
    { "data-job": job.id, "data-status": job.status },
    h("td", {}, badge(job.status)),
    h("td", { class: "mono" }, link(`/ui/jobs/${encodeURIComponent(job.id)}`, job.id)),
    h("td", {}, job.kind),
    h("td", { class: "mono" }, modelText(job.spec)),
    h("td", {}, budgetText(job.spec)),
    replaced,
    increase,
    gate,
    h("td", { title: job.created_at }, age(job.created_at)),
  );
  if (job.status === "succeeded" && job.kind === "compress") {
    // The list API has no report fields; each finished row reads its report (cached).
    report(job.id, signal)
      .then((r) => {
        replaced.textContent = r.replaced_layers.join(", ") || "–";
        increase.textContent = pct(r.perplexity?.increase_pct);
        if (r.gate) gate.replaceChildren(badge(r.gate.passed ? "passed" : "failed"));
      })
      .catch(() => {});
  }
  return row;
}

// --- submit ----------------------------------------------------------------------------------

function field(name, label, control, hint) {
  return h(
    "div",
    { class: "field", "data-field": name },
    h("label", { for: control.id }, label),
    control,
    hint ? h("p", { class: "hint" }, hint) : null,
    h("p", { class: "field-error", hidden: true }),
  );
}

function submitPage() {
  const input = (id, attrs = {}) => h("input", { id, name: id, type: "text", ...attrs });
  const kind = h(
    "select",
    { id: "kind", name: "kind" },
    h("option", { value: "compress" }, "compress"),
    h("option", { value: "analyze" }, "analyze"),
  );
  const model = input("model", { value: "smollm2-135m" });
  const budgetKind = h(
    "select",
    { id: "budget-kind", "aria-label": "Budget kind" },
    h("option", { value: "layers" }, "layers to replace (a number, or max with a gate)"),
    h("option", { value: "indices" }, "layer indices (comma-separated)"),
    h("option", { value: "target_ppl_increase" }, "target perplexity increase (%)"),
  );
  const budget = input("budget", { value: "2" });
  const dataBuiltin = h("input", {
    type: "radio",
    name: "data-source",
    value: "builtin",
    id: "data-builtin",
    checked: true,
  });
  const dataUpload = h("input", { type: "radio", name: "data-source", value: "upload", id: "data-upload" });
  const file = h("input", { type: "file", id: "data-file", accept: ".txt,.raw,.jsonl,text/plain" });
  const number = (id, value) => h("input", { id, name: id, type: "number", value, step: "any" });
  const calib = number("calib_tokens", "16384");
  const evalTokens = number("eval_tokens", "16384");
  const seqLen = number("seq_len", "512");
  const format = h(
    "select",
    { id: "format" },
    h("option", { value: "standard" }, "standard (folded HF checkpoint)"),
    h("option", { value: "linear" }, "linear (maps kept as modules)"),
  );
  const method = h(
    "select",
    { id: "method" },
    h("option", { value: "auto" }, "auto (the fitted map)"),
    h("option", { value: "fit" }, "fit (least-squares map)"),
    h("option", { value: "remove" }, "remove (drop the span, heal)"),
  );
  const gate = number("gate_ppl_increase", "");
  const healSteps = number("heal_steps", "");
  const metadata = h("textarea", { id: "metadata", placeholder: "commit=abc123\nteam=platform" });
  const formError = h("p", { id: "form-error", class: "banner", hidden: true });
  const submit = h("button", { class: "primary", type: "submit" }, "Submit");
  const compressOnly = [];
  const budgetField = h(
    "div",
    { class: "field", "data-field": "budget" },
    h("label", { for: "budget" }, "Budget"),
    h("div", { class: "toolbar" }, budgetKind, budget),
    h("p", { class: "field-error", hidden: true }),
  );
  compressOnly.push(budgetField);
  const dataField = h(
    "div",
    { class: "field", "data-field": "data" },
    h("span", { class: "label" }, h("strong", {}, "Data")),
    h(
      "div",
      {},
      h("label", { class: "choice" }, dataBuiltin, "builtin wikitext-2"),
      h("label", { class: "choice" }, dataUpload, "upload a text file"),
    ),
    file,
    h("p", { class: "hint" }, "UTF-8 text; the first half calibrates, the second half evaluates."),
    h("p", { class: "field-error", hidden: true }),
  );
  const evalField = field("eval_tokens", "Evaluation tokens", evalTokens);
  const formatField = field("format", "Format", format);
  const methodField = field(
    "method",
    "Method",
    method,
    "remove: no map; better on text unlike the calibration text.",
  );
  const gateField = field(
    "gate_ppl_increase",
    "Quality gate: max perplexity increase (%)",
    gate,
    "Empty: no gate.",
  );
  const healField = field(
    "heal_steps",
    "Healing steps",
    healSteps,
    "Empty: the default budget; 0 disables healing.",
  );
  compressOnly.push(evalField, formatField, methodField, gateField, healField);
  const form = h(
    "form",
    { class: "card", id: "submit-form", novalidate: true },
    field("kind", "Kind", kind),
    field(
      "model",
      "Model",
      model,
      "The bundled alias, or a directory / .gguf under the service's model roots.",
    ),
    budgetField,
    dataField,
    h(
      "div",
      { class: "grid" },
      field("calib_tokens", "Calibration tokens", calib),
      evalField,
      field("seq_len", "Sequence length", seqLen),
    ),
    h("div", { class: "grid" }, formatField, methodField, gateField, healField),
    field("metadata", "Metadata (key=value per line)", metadata),
    formError,
    submit,
  );
  const sync = () => {
    for (const node of compressOnly) node.hidden = kind.value !== "compress";
    file.disabled = !dataUpload.checked;
  };
  kind.addEventListener("change", sync);
  dataBuiltin.addEventListener("change", sync);
  dataUpload.addEventListener("change", sync);
  sync();

  const setError = (name, message) => {
    const target = form.querySelector(`[data-field="${name}"]`);
    if (!target || target.hidden) {
      formError.append(h("div", {}, message));
      formError.hidden = false;
      return;
    }
    target.classList.add("invalid");
    const box = target.querySelector(".field-error");
    box.textContent = box.textContent ? `${box.textContent}; ${message}` : message;
    box.hidden = false;
  };
  const clearErrors = () => {
    formError.replaceChildren();
    formError.hidden = true;
    for (const node of form.querySelectorAll(".field")) {
      node.classList.remove("invalid");
      const box = node.querySelector(".field-error");
      if (box) {
        box.textContent = "";
        box.hidden = true;
      }
    }
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const spec = {
      kind: kind.value,
      model: model.value.trim(),
      calib_tokens: numberOrText(calib.value),
      seq_len: numberOrText(seqLen.value),
    };
    const meta = parseMetadata(metadata.value);
    if (meta.error) return setError("metadata", meta.error);
    spec.metadata = meta.value;
    if (kind.value === "compress") {
      spec.eval_tokens = numberOrText(evalTokens.value);
      spec.format = format.value;
      spec.method = method.value;
      const raw = budget.value.trim();
      if (budgetKind.value === "indices")
        spec.indices = raw ? raw.split(",").map((s) => numberOrText(s.trim())) : [];
      else spec[budgetKind.value] = numberOrText(raw);
      if (gate.value.trim()) spec.gate_ppl_increase = numberOrText(gate.value);
      if (healSteps.value.trim()) spec.heal_steps = numberOrText(healSteps.value);
    }
    submit.disabled = true;
    try {
      if (dataUpload.checked) {
        if (!file.files.length) return setError("data", "Choose a file to upload, or use the builtin text.");
        const upload = new FormData();
        upload.append("file", file.files[0]);
        try {
          const dataset = await api("/v1/datasets", { method: "POST", body: upload });
          spec.data = { dataset_id: dataset.id };
        } catch (error) {
          return setError("data", `Upload refused: ${errorText(error)}`);
        }
      } else {
        spec.data = { builtin: "wikitext2" };
      }
      const job = await api("/v1/jobs", { method: "POST", json: spec });
      navigate(`/ui/jobs/${encodeURIComponent(job.id)}`);
    } catch (error) {
      if (error.status === 422 && Array.isArray(error.detail)) {
        for (const problem of error.detail) setError(fieldOf(problem, spec.kind), problem.msg);
      } else {
        setError("", errorText(error));
      }
    } finally {
      submit.disabled = false;
    }
  });
  show(h("h1", {}, "Submit a job"), form);
}

// "12" -> 12; anything not a number goes to the API as typed, so its 422 names the field.
function numberOrText(value) {
  const text = String(value).trim();
  return text !== "" && Number.isFinite(Number(text)) ? Number(text) : text;
}

function parseMetadata(text) {
  const value = {};
  for (const [i, line] of text.split("\n").entries()) {
    if (!line.trim()) continue;
    const cut = line.indexOf("=");
    if (cut <= 0) return { error: `line ${i + 1}: expected key=value` };
    value[line.slice(0, cut).trim()] = line.slice(cut + 1).trim();
  }
  return { value };
}

// The form field a 422 item is about: loc is ["body", <kind tag>?, field, ...].
function fieldOf(problem, kind) {
  const loc = (problem.loc || []).slice(1).filter((part) => part !== kind);
  const name = loc[0];
  if (["layers", "indices", "target_ppl_increase"].includes(name)) return "budget";
  if (name === "data" || name === "dataset_id") return "data";
  if (name === undefined && /budget|layers|indices/.test(problem.msg)) return "budget";
  return name === undefined ? "" : String(name);
}

// --- one job ---------------------------------------------------------------------------------

async function jobPage(jobId, signal) {
  let job;
  try {
    job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal });
  } catch (error) {
    if (error.status !== 404) throw error;
    // Another tenant's job is "not found" here exactly as in the API.
    show(
      h("h1", {}, "Job not found"),
      h("p", { class: "banner", id: "not-found" }, `No job ${jobId} for this API key (${errorText(error)}).`),
    );
    return;
  }
  const header = h("div");
  const body = h("div");
  show(header, body);
  renderJobHeader(header, job);
  if (TERMINAL.has(job.status)) return renderFinished(body, job, null, signal);
  await renderLive(header, body, job, signal);
}

function renderJobHeader(container, job) {
  const spec = job.spec;
  const meta = Object.entries(job.metadata || {});
  const details = h(
    "dl",
    { class: "kv" },
    h("dt", {}, "kind"),
    h("dd", {}, job.kind),
    h("dt", {}, "model"),
    h("dd", { class: "mono", id: "job-model" }, modelText(spec)),
    h("dt", {}, "budget"),
    h("dd", {}, budgetText(spec)),
    h("dt", {}, "data"),
    h("dd", { class: "mono", id: "job-data" }, dataText(spec.data)),
    h("dt", {}, "created"),
    h("dd", {}, when(job.created_at)),
    h("dt", {}, "started"),
    h("dd", {}, when(job.started_at)),
    h("dt", {}, "finished"),
    h("dd", {}, when(job.finished_at)),
    h("dt", {}, "attempts"),
    h("dd", {}, String(job.attempts)),
  );
  const metadata = meta.length
    ? h(
        "dl",
        { class: "kv", id: "job-metadata" },
        meta.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
      )
    : h("p", { class: "muted" }, "none");
  container.replaceChildren(
    h("div", { class: "toolbar" }, h("h1", { class: "mono" }, job.id), statusBadge(job.status)),
    h(
      "div",
      { class: "grid" },
      h("div", { class: "card" }, h("h3", {}, "Job"), details),
      h(
        "div",
        { class: "card" },
        h("h3", {}, "Metadata"),
        metadata,
        h("details", {}, h("summary", {}, "spec"), h("pre", {}, JSON.stringify(spec, null, 2))),
      ),
    ),
  );
  if (spec.data?.dataset_id) {
    api(`/v1/datasets/${encodeURIComponent(spec.data.dataset_id)}`)
      .then((ds) => {
        const node = container.querySelector("#job-data");
        if (node)
          node.textContent = `${ds.id} · ${ds.filename ?? "(no file name)"} · ${bytes(ds.bytes)} · sha256 ${ds.sha256.slice(0, 12)}…`;
      })
      .catch(() => {});
  }
}

function dataText(data) {
  if (!data) return "–";
  return data.dataset_id ?? data.builtin ?? data.path ?? "–";
}

async function renderLive(header, body, job, signal) {
  const stage = h("span", { id: "stage" }, job.progress.stage || "waiting for a worker");
  const bar = h("progress", { id: "progress", max: 100, value: job.progress.percent || 0 });
  const counter = h("span", { class: "muted" });
  const list = h("ul", { class: "events", id: "events" });
  const cancel = h("button", { class: "danger", type: "button", id: "cancel" }, "Cancel job");
  const events = [];
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      const updated = await api(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
      renderJobHeader(header, updated);
    } catch (error) {
      cancel.disabled = false;
      list.prepend(h("li", { class: "error" }, `cancel failed: ${errorText(error)}`));
    }
  });
  body.replaceChildren(
    h(
      "div",
      { class: "card", id: "live" },
      h("div", { class: "toolbar" }, h("strong", {}, "Stage: "), stage, counter, cancel),
      bar,
      list,
    ),
  );
  let status = job.status;
  await followEvents(
    job.id,
    null,
    (event) => {
      events.push(event);
      if (event.type === "status") {
        status = event.status;
        header.querySelector("#job-status").replaceWith(statusBadge(status));
        if (status === "cancelling") cancel.disabled = true;
      }
      if (event.stage) {
        stage.textContent = event.stage;
        bar.value = event.total ? (100 * event.current) / event.total : 0;
        counter.textContent = event.total ? `${event.current} / ${event.total}` : "";
      }
      if (event.message) {
        list.prepend(
          h(
            "li",
            {},
            h("span", { class: "when" }, new Date(event.ts).toLocaleTimeString()),
            event.stage ? `[${event.stage}] ` : "",
            event.message,
          ),
        );
        while (list.children.length > 50) list.lastChild.remove();
      }
    },
    signal,
  );
  if (signal.aborted) return;
  const finished = await api(`/v1/jobs/${encodeURIComponent(job.id)}`, { signal });
  renderJobHeader(header, finished);
  await renderFinished(body, finished, events, signal);
}

async function renderFinished(body, job, events, signal) {
  if (job.status !== "succeeded") {
    const all = events ?? (await allEvents(job.id, signal));
    const last = all.slice(-20).reverse();
    body.replaceChildren(
      job.error
        ? h(
            "div",
            { class: "banner", id: "job-error" },
            h("strong", {}, `${job.error.code}: `),
            job.error.message,
          )
        : h("div", { class: "banner", id: "job-error" }, `The job was ${job.status}.`),
      h("h2", {}, "Last events"),
      h(
        "div",
        { class: "card" },
        h(
          "ul",
          { class: "events" },
          last.map((e) =>
            h(
              "li",
              {},
              h("span", { class: "when" }, new Date(e.ts).toLocaleTimeString()),
              e.type === "status" ? `status ${e.status}: ` : e.stage ? `[${e.stage}] ` : "",
              e.message,
            ),
          ),
        ),
      ),
    );
    return;
  }
  const [rep, artifacts] = await Promise.all([
    report(job.id, signal),
    job.kind === "compress"
      ? api(`/v1/jobs/${encodeURIComponent(job.id)}/artifacts`, { signal }).catch((e) => e)
      : null,
  ]);
  const healing = rep.selection?.healing;
  // Reports from before selection.healing.curve existed: read the curve from the events.
  const needEvents = healing?.steps && !healing.curve;
  const healEvents = needEvents ? (events ?? (await allEvents(job.id, signal))) : [];
  body.replaceChildren(...reportView(job, rep, artifacts, healEvents));
  if (job.kind === "compress") body.append(compareChooser(job, signal));
}

function stat(label, value, id) {
  return h(
    "div",
    { class: "stat", id },
    h("div", { class: "label" }, label),
    h("div", { class: "value" }, value),
  );
}

function reportView(job, rep, artifacts, events) {
  const ppl = rep.perplexity;
  const m = rep.model;
  const parts = [];
  const summary = [
    stat(
      "layers",
      m.layers_after != null ? `${m.layers_before} → ${m.layers_after}` : String(m.layers_before),
    ),
    rep.kind === "compress"
      ? stat("replaced", rep.replaced_layers.join(", ") || "none", "summary-replaced")
      : null,
    stat(
      "parameters",
      m.params_after != null
        ? `${millions(m.params_before)} → ${millions(m.params_after)}`
        : millions(m.params_before),
    ),
  ];
  if (ppl) {
    summary.push(
      stat(
        "perplexity",
        ppl.compressed != null ? `${fmt(ppl.baseline)} → ${fmt(ppl.compressed)}` : fmt(ppl.baseline),
      ),
    );
    if (ppl.increase_pct != null) summary.push(stat("increase", pct(ppl.increase_pct), "summary-increase"));
  }
  // Texts unlike the calibration text (--eval-data, or the general mixture), beside the eval text.
  for (const t of rep.eval_texts || []) {
    if (t.compressed != null) {
      summary.push(stat(`${t.name} text`, `${fmt(t.baseline)} → ${fmt(t.compressed)} (${pct(t.increase_pct)})`));
    }
  }
  if (rep.gate) summary.push(stat("gate", rep.gate.passed ? "passed" : "failed", "summary-gate"));
  if (m.checkpoint_bytes != null) summary.push(stat("checkpoint", bytes(m.checkpoint_bytes)));
  // A quantized source is read and written dequantized: its size on disk next to the output's.
  const q = m.source_quantization;
  if (q) {
    summary.push(
      stat("quantized source", `${q.scheme}, ${bytes(q.bytes)} → ${q.output_dtype || "–"}, ${bytes(q.output_bytes)}`),
    );
  }
  if (rep.throughput?.tokens_per_s_after != null) {
    summary.push(
      stat(
        "tokens/s",
        // A measurement outside what the FLOPs allow is flagged in the report, not shown as a result.
        rep.throughput.flag
          ? "flagged (see report)"
          : `${Math.round(rep.throughput.tokens_per_s_before)} → ${Math.round(rep.throughput.tokens_per_s_after)}`,
      ),
    );
  }
  parts.push(
    h("h2", {}, "Summary"),
    h(
      "div",
      { class: "card" },
      h("div", { class: "stats", id: "summary" }, summary),
      rep.notes?.length
        ? h(
            "ul",
            { class: "muted" },
            rep.notes.map((n) => h("li", {}, n)),
          )
        : null,
    ),
  );
  if (rep.linearity?.length) parts.push(...linearitySection(rep));
  if (rep.compare?.length) parts.push(...compareReportSection(rep));
  if (ppl) parts.push(perplexitySection(rep, job));
  if (rep.curve?.length) parts.push(...curveSection(rep));
  const healing = rep.selection?.healing;
  if (healing) {
    const { points, source } = healingCurve(healing, events);
    if (points.length > 1) parts.push(...healingSection(healing, points, source));
  }
  const triggers = rep.linearity?.filter((l) => l.trigger_tokens?.length) ?? [];
  if (triggers.length) parts.push(triggerSection(rep, triggers));
  if (rep.gate) {
    parts.push(
      h("h2", {}, "Gate"),
      h(
        "div",
        { class: "card" },
        table(
          ["rule", { label: "limit", num: true }, { label: "value", num: true }, "result"],
          rep.gate.rules.map((r) =>
            h(
              "tr",
              {},
              h("td", {}, r.name),
              h("td", { class: "num" }, fmt(r.limit)),
              h("td", { class: "num" }, fmt(r.value)),
              h("td", {}, badge(r.passed ? "passed" : "failed")),
            ),
          ),
          { id: "gate-table" },
        ),
      ),
    );
  }
  if (artifacts) parts.push(artifactSection(job, artifacts));
  return parts;
}

// The layers=max search: every k it measured (linearize.search), in the order measured.
function curveSection(rep) {
  const s = rep.selection ?? {};
  const intro =
    `${s.trials} trials, ${s.healed_trials} healed; chosen k = ${s.chosen_k ?? "none"}` +
    (s.stopped_by ? `; stopped by its ${s.stopped_by}` : "") +
    (s.monotone === false ? `; not monotone: ${s.violations.join("; ")}` : "") +
    ". Probes are unhealed; every trial is measured on the validation slice.";
  const num = (label) => ({ label, num: true });
  const rows = rep.curve.map((p) =>
    h(
      "tr",
      { class: p.chosen ? "chosen" : "" },
      h("td", { class: "num" }, String(p.k)),
      h("td", {}, `${p.healed ? "healed" : "probe"} (${p.method})`),
      h("td", { class: "num" }, millions(p.params_removed)),
      h("td", { class: "num" }, fmt(p.perplexity, 3)),
      h("td", { class: "num" }, pct(p.ppl_increase_pct)),
      h("td", { class: "num" }, fmt(p.kl, 4)),
      h("td", { class: "num" }, fmt(p.top1_agreement_pct, 1)),
      h("td", {}, badge(p.passed ? "passed" : "failed"), p.chosen ? " chosen" : ""),
      h("td", { class: "num" }, fmt(p.seconds, 1)),
    ),
  );
  return [
    h("h2", {}, "Size against quality"),
    h(
      "div",
      { class: "card" },
      h("p", { class: "muted" }, intro),
      table(
        [num("k"), "trial", num("removed"), num("perplexity"), num("increase"), num("KL")]
          .concat([num("top-1 %"), "gates", num("seconds")]),
        rows,
        { id: "curve-table" },
      ),
    ),
  ];
}

function linearitySection(rep) {
  const replaced = rep.replaced_layers;
  const charts = LINEARITY_METRICS.filter(([key]) => rep.linearity.some((l) => l[key] != null)).map(
    ([key, label]) =>
      h(
        "div",
        {},
        h("h3", {}, label),
        lineChart({
          series: [
            {
              name: key,
              points: rep.linearity.map((l) => ({
                x: l.index,
                y: l[key],
                title: `layer ${l.index}: ${fmt(l[key], 5)}`,
              })),
            },
          ],
          label: `${label} per layer`,
          xLabel: "layer",
          highlight: replaced,
          chartId: `linearity-${key}`,
        }),
      ),
  );
  return [
    h(
      "h2",
      {},
      rep.compare?.length ? `Linearity per layer of ${rep.compare[0].model}` : "Linearity per layer",
    ),
    h(
      "div",
      { class: "card" },
      h("div", { class: "charts" }, charts),
      h(
        "div",
        { class: "legend" },
        h("span", {}, h("span", { class: "swatch hl" }), "replaced layers"),
        h("span", {}, "paper score: R² of the layer output on its input (1 = linear)"),
      ),
      rep.linearity_notes ? h("p", { class: "hint" }, rep.linearity_notes) : null,
    ),
  ];
}

function compareReportSection(rep) {
  const series = rep.compare.map((entry, i) => ({
    name: entry.model,
    cls: `c${i % 4}`,
    points: entry.layers.map((l) => ({
      x: l.index,
      y: l.score,
      title: `${entry.model} layer ${l.index}: ${fmt(l.score, 5)}`,
    })),
  }));
  const rows = [];
  for (const entry of rep.compare.slice(1)) {
    for (const d of entry.differences ?? []) {
      rows.push(
        h(
          "tr",
          {},
          h("td", { class: "mono" }, entry.model),
          h("td", { class: "num" }, String(d.index)),
          ...["score", "score_without_residual", "anisotropy", "intrinsic_dimension"].map((k) =>
            h("td", { class: "num" }, fmt(d[k], 5)),
          ),
        ),
      );
    }
  }
  return [
    h("h2", {}, "Models compared"),
    h(
      "div",
      { class: "card" },
      h(
        "div",
        { class: "chart-box" },
        lineChart({
          series,
          label: "paper score per layer, each model",
          xLabel: "layer",
          chartId: "compare-score",
        }),
      ),
      h(
        "div",
        { class: "legend" },
        series.map((s) => h("span", {}, h("span", { class: `swatch ${s.cls}` }), s.name)),
      ),
      h("h3", {}, "Per-layer differences (model − first)"),
      table(
        [
          "model",
          { label: "layer", num: true },
          { label: "Δ score", num: true },
          { label: "Δ w/o residual", num: true },
          { label: "Δ anisotropy", num: true },
          { label: "Δ intrinsic dim", num: true },
        ],
        rows,
        { id: "compare-differences" },
      ),
    ),
  ];
}

function perplexitySection(rep, job) {
  const ppl = rep.perplexity;
  const bars = [{ label: "baseline", value: ppl.baseline, text: fmt(ppl.baseline), cls: "c0" }];
  if (ppl.before_healing != null)
    bars.push({
      label: "replaced, before healing",
      value: ppl.before_healing,
      text: fmt(ppl.before_healing),
      cls: "c1",
    });
  if (ppl.compressed != null)
    bars.push({ label: "reloaded checkpoint", value: ppl.compressed, text: fmt(ppl.compressed), cls: "c2" });
  const limit = job.spec.gate_ppl_increase ?? job.spec.target_ppl_increase;
  const reference =
    limit != null ? { value: ppl.baseline * (1 + limit / 100), label: `budget +${limit} %` } : null;
  const rows = [
    ["baseline", ppl.baseline],
    ["before healing", ppl.before_healing],
    ["reloaded (published)", ppl.reloaded ?? ppl.compressed],
    ["validation baseline", ppl.validation_baseline],
    ["validation compressed", ppl.validation_compressed],
    ["validation reloaded", ppl.validation_reloaded],
  ]
    .filter(([, v]) => v != null)
    .map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, fmt(v, 3))));
  return h(
    "div",
    {},
    h("h2", {}, "Perplexity"),
    h(
      "div",
      { class: "card" },
      h(
        "div",
        { class: "side" },
        barChart({ bars, reference, label: "Perplexity on the evaluation windows", chartId: "perplexity" }),
        table(["measure", { label: "perplexity", num: true }], rows, { id: "ppl-table" }),
      ),
      h("p", { class: "hint" }, ppl.definition),
    ),
  );
}

// The report's curve (bucket means, at most 200 points); reports from before it existed
// fall back to the "loss …" messages of the heal stage's progress events.
function healingCurve(healing, events) {
  if (healing.curve) {
    const points = healing.curve.map(([step, loss]) => ({
      x: step,
      y: loss,
      title: `step ${step}: ${loss}`,
    }));
    return { points, source: curveSource(healing) };
  }
  const points = [];
  for (const e of events ?? []) {
    const match = e.stage === "heal" && /^loss ([-\d.eE+]+)/.exec(e.message || "");
    if (match) points.push({ x: e.current, y: Number(match[1]), title: `step ${e.current}: ${match[1]}` });
  }
  return { points, source: "Loss sampled from the progress events." };
}

// The first point closes the first bucket, so its step is the bucket size.
function curveSource(healing) {
  const perPoint = healing.curve[0]?.[0] ?? 1;
  return perPoint > 1 ? `Each point: the mean loss of ${perPoint} steps.` : "The loss of every step.";
}

function healingSection(healing, points, source) {
  return [
    h("h2", {}, "Healing"),
    h(
      "div",
      { class: "card", id: "healing" },
      h(
        "div",
        { class: "chart-box" },
        lineChart({
          series: [{ name: "training loss", points }],
          label: "Healing loss per step",
          xLabel: "step",
          marks: false,
          chartId: "healing",
        }),
      ),
      h(
        "p",
        { class: "muted" },
        `${healing.steps} steps in ${fmt(healing.seconds, 1)} s; kept: ${healing.kept}. ${source}`,
      ),
    ),
  ];
}

function triggerSection(rep, layers) {
  const replaced = new Set(rep.replaced_layers);
  const ordered = [...layers].sort(
    (a, b) => Number(replaced.has(b.index)) - Number(replaced.has(a.index)) || a.index - b.index,
  );
  const rows = (list) =>
    list.flatMap((l) =>
      l.trigger_tokens.map((t) =>
        h(
          "tr",
          { class: replaced.has(l.index) ? "replaced" : null },
          h("td", { class: "num" }, String(l.index)),
          h("td", { class: "mono" }, JSON.stringify(t.token)),
          h("td", { class: "mono" }, t.context),
          h("td", { class: "num" }, `${(100 * t.residual_share).toFixed(1)} %`),
        ),
      ),
    );
  const head = [{ label: "layer", num: true }, "token", "context", { label: "share of residual", num: true }];
  const mine = ordered.filter((l) => replaced.has(l.index));
  const others = ordered.filter((l) => !replaced.has(l.index));
  // The replaced layers matter most; the others are one click away.
  const primary = mine.length ? mine : others;
  return h(
    "div",
    {},
    h("h2", {}, "Tokens that trigger the largest residuals"),
    h(
      "div",
      { class: "card" },
      table(head, rows(primary), { id: "trigger-table" }),
      mine.length && others.length
        ? h("details", {}, h("summary", {}, `the other ${others.length} layers`), table(head, rows(others)))
        : null,
    ),
  );
}

function artifactSection(job, artifacts) {
  if (artifacts instanceof Error) {
    return h("div", {}, h("h2", {}, "Artifacts"), h("p", { class: "banner" }, errorText(artifacts)));
  }
  const rows = artifacts.items.map((a) => {
    const button = h("a", { href: "#", class: "download", "data-path": a.path }, a.path);
    const check = h("span", { class: "muted" });
    button.addEventListener("click", (event) => {
      event.preventDefault();
      download(job.id, a, check);
    });
    return h(
      "tr",
      {},
      h("td", { class: "mono" }, button),
      h("td", { class: "num" }, bytes(a.size)),
      h("td", { class: "mono sha" }, a.sha256),
      h("td", {}, check),
    );
  });
  return h(
    "div",
    {},
    h("h2", {}, "Artifacts"),
    h(
      "div",
      { class: "card" },
      table(["file", { label: "size", num: true }, "sha256", ""], rows, { id: "artifact-table" }),
      h(
        "p",
        { class: "hint" },
        `${artifacts.items.length} files, ${bytes(artifacts.total_bytes)}. `,
        h(
          "a",
          {
            href: "#",
            id: "download-tar",
            on: {
              click: (e) => {
                e.preventDefault();
                download(job.id, { path: "checkpoint.tar", whole: true }, e.target.nextSibling);
              },
            },
          },
          "the whole checkpoint as a tar",
        ),
        h("span", { class: "muted" }),
      ),
    ),
  );
}

// Downloads go through fetch (they need the Bearer header), then a blob link; the digest is
// checked in the page when the browser offers SubtleCrypto (loopback and https).
async function download(jobId, artifact, status) {
  status.textContent = " downloading…";
  try {
    const path = artifact.whole
      ? "checkpoint.tar"
      : `artifacts/${artifact.path.split("/").map(encodeURIComponent).join("/")}`;
    const response = await request(`/v1/jobs/${encodeURIComponent(jobId)}/${path}`);
    if (!response.ok)
      throw new ApiError(
        response.status,
        (await response.json().catch(() => null))?.detail ?? response.statusText,
      );
    const blob = await response.blob();
    if (!artifact.whole && crypto.subtle) {
      const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
      const hex = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
      status.textContent = hex === artifact.sha256 ? " sha256 verified" : " sha256 MISMATCH";
      status.className = hex === artifact.sha256 ? "muted" : "error";
    } else {
      status.textContent = "";
    }
    const url = URL.createObjectURL(blob);
    const anchor = h("a", {
      href: url,
      download: artifact.whole ? `${jobId}.tar` : artifact.path.split("/").pop(),
      hidden: true,
    });
    document.body.append(anchor);
    anchor.click();
    anchor.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (error) {
    status.textContent = ` ${errorText(error)}`;
    status.className = "error";
  }
}

function compareChooser(job, signal) {
  const select = h(
    "select",
    { id: "compare-with", "aria-label": "Job to compare with" },
    h("option", { value: "" }, "choose a finished job on the same model…"),
  );
  const go = h("button", { class: "secondary", type: "button", id: "compare-go" }, "Compare");
  go.addEventListener("click", () => {
    if (select.value)
      navigate(`/ui/compare?a=${encodeURIComponent(job.id)}&b=${encodeURIComponent(select.value)}`);
  });
  api("/v1/jobs?status=succeeded&limit=100", { signal })
    .then((page) => {
      for (const other of page.items) {
        if (other.id !== job.id && other.kind === "compress" && other.spec.model === job.spec.model) {
          select.append(
            h(
              "option",
              { value: other.id },
              `${other.id} · ${budgetText(other.spec)} · ${age(other.created_at)}`,
            ),
          );
        }
      }
    })
    .catch(() => {});
  return h("div", {}, h("h2", {}, "Compare"), h("div", { class: "card toolbar" }, select, go));
}

// --- compare two jobs ------------------------------------------------------------------------

async function comparePage(params, signal) {
  const a = params.get("a");
  const b = params.get("b");
  const inputA = h("input", {
    type: "text",
    id: "compare-a",
    value: a || "",
    placeholder: "job_…",
    "aria-label": "First job",
  });
  const inputB = h("input", {
    type: "text",
    id: "compare-b",
    value: b || "",
    placeholder: "job_…",
    "aria-label": "Second job",
  });
  const form = h(
    "form",
    { class: "card toolbar" },
    inputA,
    inputB,
    h("button", { class: "primary", type: "submit" }, "Compare"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    navigate(
      `/ui/compare?a=${encodeURIComponent(inputA.value.trim())}&b=${encodeURIComponent(inputB.value.trim())}`,
    );
  });
  const out = h("div");
  show(h("h1", {}, "Compare two jobs"), form, out);
  if (!a || !b) return;
  const load = async (id) => {
    const job = await api(`/v1/jobs/${encodeURIComponent(id)}`, { signal });
    if (job.status !== "succeeded")
      throw new ApiError(409, `${id} is ${job.status}; only finished jobs have a report`);
    return { job, rep: await report(id, signal) };
  };
  let left;
  let right;
  try {
    [left, right] = await Promise.all([load(a), load(b)]);
  } catch (error) {
    out.replaceChildren(
      h("p", { class: "banner" }, error.status === 404 ? "job not found" : errorText(error)),
    );
    return;
  }
  const column = ({ job, rep }, cls) => {
    const ppl = rep.perplexity;
    return h(
      "div",
      { class: "card" },
      h("h3", { class: "mono" }, link(`/ui/jobs/${encodeURIComponent(job.id)}`, job.id)),
      h(
        "dl",
        { class: "kv" },
        h("dt", {}, "model"),
        h("dd", { class: "mono" }, modelText(job.spec)),
        h("dt", {}, "budget"),
        h("dd", {}, budgetText(job.spec)),
        h("dt", {}, "replaced"),
        h("dd", {}, rep.replaced_layers.join(", ") || "none"),
        h("dt", {}, "layers"),
        h("dd", {}, `${rep.model.layers_before} → ${rep.model.layers_after ?? rep.model.layers_before}`),
        h("dt", {}, "perplexity"),
        h("dd", {}, ppl ? `${fmt(ppl.baseline)} → ${fmt(ppl.compressed)} (${pct(ppl.increase_pct)})` : "–"),
        h("dt", {}, "gate"),
        h("dd", {}, rep.gate ? (rep.gate.passed ? "passed" : "failed") : "–"),
      ),
      h(
        "div",
        { class: "legend" },
        h("span", {}, h("span", { class: `swatch ${cls}` }), "this job's replaced layers"),
      ),
    );
  };
  const sameModel = left.job.spec.model === right.job.spec.model;
  const series = [left, right].map(({ job, rep }, i) => ({
    name: job.id,
    cls: `c${i}`,
    points: rep.linearity.map((l) => ({
      x: l.index,
      y: l.score,
      title: `${job.id} layer ${l.index}: ${fmt(l.score, 5)}`,
    })),
  }));
  const rows = left.rep.linearity.map((l, i) => {
    const r = right.rep.linearity[i];
    const mark = (rep, index) => (rep.replaced_layers.includes(index) ? "replaced" : "");
    return h(
      "tr",
      {},
      h("td", { class: "num" }, String(l.index)),
      h("td", { class: "num" }, fmt(l.score, 5)),
      h("td", {}, mark(left.rep, l.index)),
      h("td", { class: "num" }, fmt(r?.score, 5)),
      h("td", {}, r ? mark(right.rep, r.index) : ""),
      h("td", { class: "num" }, r ? fmt(r.score - l.score, 5) : "–"),
    );
  });
  out.replaceChildren(
    ...(sameModel
      ? []
      : [
          h(
            "p",
            { class: "banner" },
            "These jobs ran on different models; per-layer rows are matched by index.",
          ),
        ]),
    h("div", { class: "side", id: "compare-columns" }, column(left, "c0"), column(right, "c1")),
    h(
      "div",
      { class: "card" },
      h("h3", {}, "Paper score per layer"),
      h(
        "div",
        { class: "chart-box" },
        lineChart({
          series,
          label: "paper score per layer, both jobs",
          xLabel: "layer",
          chartId: "compare-linearity",
        }),
      ),
      h(
        "div",
        { class: "legend" },
        series.map((s) => h("span", {}, h("span", { class: `swatch ${s.cls}` }), s.name)),
      ),
    ),
    h(
      "div",
      { class: "card" },
      table(
        [
          { label: "layer", num: true },
          { label: "score A", num: true },
          "A",
          { label: "score B", num: true },
          "B",
          { label: "B − A", num: true },
        ],
        rows,
        { id: "compare-table" },
      ),
    ),
  );
}

// --- start -----------------------------------------------------------------------------------

document.addEventListener("click", (event) => {
  const anchor = event.target.closest("a[data-nav]");
  if (!anchor || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(anchor.getAttribute("href"));
});
window.addEventListener("popstate", render);
document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
render();
