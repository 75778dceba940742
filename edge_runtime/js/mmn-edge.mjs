// mmn-edge.mjs: run an mmn-fed bundle in a JavaScript ONNX Runtime host (browser or node), from its
// portable graph. No build step and no dependency: the caller passes onnxruntime-web as `ort`.
//
//   import * as ort from "onnxruntime-web";
//   import { loadBundle } from "./mmn-edge.mjs";
//   const bundle = await loadBundle("https://host/bundle/", { ort, trustKey });  // 32 raw Ed25519 bytes
//   const out = await bundle.predict([{ age: "63", sex: "Male", cp: "" }]);
//   out[0].disease          // binary: p(1); multiclass: [p per class]; regression: the value
//   out[0].steps.disease    // trajectory: after the prior, then after each modality (bundle.stepNames)
//   out[0].used             // the modalities the row had (the steps that changed its state)
//   out[0].error            // set (and every value null) when the row is not predicted
//
// Loading fetches manifest.json as bytes, checks its format, and requires manifest.portable (bundles exported
// before the portable graph must be re-exported). With `trustKey` the bundle must be signed: manifest.sig is
// checked with WebCrypto Ed25519 over manifest.json's exact bytes. The portable graph's size and SHA-256 are
// checked against manifest.files before ONNX Runtime sees a byte. The contract with the graph (docs/edge.md,
// "Other hosts: JavaScript"): one 1-D input per column, in manifest.portable.inputs; "double" columns are
// float64 with NaN for missing, "string" columns the canonical category text ("" for missing); output
// out.<task> is float32 [S*n, k] with S = 1 + steps, stacked step-major, block S-1 being the prediction
// (regression: standardized, mapped back here in double with the manifest's mean and std, as Python does);
// mask.<modality> is bool [n, 1], true where the row has the modality.
// Value parsing follows edge_runtime/preprocessing.py: a non-numeric value in a numeric column makes the row
// not predicted, as does a row with no value in any input column.

export const FORMAT = "mmn-fed-bundle";
const MISSING = new Set(["", "na", "n/a", "nan", "null", "none", "?"]);
const DECIMAL = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i; // what Python's float() reads (no hex, no 0b/0o)

/** True when a raw value is missing: null/undefined, NaN, or (trimmed, any case) "", NA, N/A, NaN, null, none, ?. */
export function isMissing(v) {
  if (v === null || v === undefined) return true;
  if (typeof v === "number") return Number.isNaN(v);
  if (typeof v === "string") return MISSING.has(v.trim().toLowerCase());
  return false;
}

// Text -> number as Python's float() reads it: decimal only ("0x10", "0b1" and "" are not numbers, unlike Number()).
const toNumber = (s) => (DECIMAL.test(s) ? Number(s) : /^[+-]?inf(inity)?$/i.test(s) ? Infinity : NaN);

/** A numeric column's value -> [float64 (NaN for missing), problem or null]. */
export function parseDouble(v) {
  if (isMissing(v)) return [NaN, null];
  if (typeof v === "boolean") return [NaN, "expected a number, got a boolean"];
  const f = typeof v === "number" ? v : toNumber(String(v).trim());
  if (Number.isNaN(f)) return [NaN, "expected a number"];
  if (!Number.isFinite(f)) return [NaN, "non-finite number"];
  return [f, null];
}

/** A categorical column's value -> its canonical text: trimmed; an integer-valued number as that integer
 *  ("1.0" -> "1"); booleans "True"/"False"; "" for missing (edge_runtime/schema.py canonical_category). */
export function canonicalCategory(v) {
  if (isMissing(v)) return "";
  if (typeof v === "boolean") return v ? "True" : "False";
  const s = String(v).trim();
  const f = typeof v === "number" ? v : toNumber(s);
  if (Number.isFinite(f) && Number.isInteger(f)) return BigInt(f).toString(); // 1e21 -> digits, as Python
  return s;
}

const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");

async function fetchBytes(fetcher, url, { optional = false } = {}) {
  const r = await fetcher(url);
  if (optional && r.status === 404) return null;
  if (!r.ok) throw new Error(`cannot fetch ${url}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

async function verifySignature(manifestBytes, sig, trustKey) {
  const subtle = globalThis.crypto && globalThis.crypto.subtle;
  let key;
  try {
    key = await subtle.importKey("raw", trustKey, { name: "Ed25519" }, false, ["verify"]);
  } catch (e) {
    if (!subtle || (e && e.name === "NotSupportedError")) {
      throw new Error("Ed25519 signature verification is unavailable in this host (WebCrypto has no Ed25519); " +
                      "refusing the signed bundle");
    }
    throw new Error(`trust key is not a raw 32-byte Ed25519 public key: ${e && e.message}`);
  }
  if (sig.length !== 64) throw new Error(`manifest.sig is ${sig.length} bytes; an Ed25519 signature is 64 bytes`);
  if (!(await subtle.verify({ name: "Ed25519" }, key, sig, manifestBytes))) {
    throw new Error("signature of manifest.json does not verify with the trust key: the manifest was modified " +
                    "or signed by another key; refusing the bundle");
  }
}

/**
 * Load a bundle served at `baseUrl` (a directory URL). Options: `ort` (onnxruntime-web, required),
 * `trustKey` (32 raw Ed25519 public key bytes: the bundle must then be signed by it), `verify` (default true:
 * check the portable graph's size and SHA-256, and the signature when `trustKey` is given; false only for
 * development), `sessionOptions` (passed to ort.InferenceSession.create), `fetch` (default globalThis.fetch).
 */
export async function loadBundle(baseUrl, { ort, verify = true, trustKey = null, sessionOptions = {}, fetch } = {}) {
  if (!ort || !ort.InferenceSession) throw new Error("loadBundle needs { ort }: the onnxruntime-web module");
  const fetcher = fetch || globalThis.fetch.bind(globalThis);
  const base = new URL(String(baseUrl).endsWith("/") ? String(baseUrl) : `${baseUrl}/`, globalThis.location?.href);
  const raw = await fetchBytes(fetcher, new URL("manifest.json", base));
  let manifest;
  try {
    manifest = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(raw));
  } catch (e) {
    throw new Error(`${base}manifest.json is not valid JSON (${e.message}); the bundle is damaged`);
  }
  if (!manifest || manifest.format !== FORMAT) {
    throw new Error(`${base} is not an mmn-fed bundle (manifest format ${JSON.stringify(manifest && manifest.format)})`);
  }
  let signed = false;
  if (verify && trustKey) {
    const sig = await fetchBytes(fetcher, new URL("manifest.sig", base), { optional: true });
    if (sig === null) throw new Error(`bundle ${base} is unsigned (manifest.sig missing) but a trust key was given; refusing it`);
    await verifySignature(raw, sig, trustKey instanceof Uint8Array ? trustKey : new Uint8Array(trustKey));
    signed = true;
  }
  const portable = manifest.portable;
  if (!portable || typeof portable !== "object" || !portable.file) {
    throw new Error(`bundle ${base} has no portable graph (manifest.portable): it was exported by an older ` +
                    "mmn-fed; re-export it with a current `mmn-fed export`");
  }
  const entry = (manifest.files || {})[portable.file];
  if (!entry) throw new Error(`manifest.files does not list the portable graph ${portable.file}`);
  const bytes = await fetchBytes(fetcher, new URL(portable.file, base));
  if (verify) {
    if (bytes.length !== entry.bytes) {
      throw new Error(`${portable.file} is ${bytes.length} bytes, the manifest says ${entry.bytes}: truncated or ` +
                      "modified; refusing the bundle");
    }
    if (hex(await globalThis.crypto.subtle.digest("SHA-256", bytes)) !== entry.sha256) {
      throw new Error(`${portable.file} does not match its sha256 in the manifest: modified; refusing the bundle`);
    }
  }
  const session = await ort.InferenceSession.create(bytes, sessionOptions);
  return new Bundle(ort, session, manifest, signed);
}

export class Bundle {
  constructor(ort, session, manifest, signed) {
    this.ort = ort;
    this.session = session;
    this.manifest = manifest;
    this.signed = signed; // true: manifest.sig verified against the trust key
    const p = manifest.portable;
    if (!Array.isArray(p.inputs) || !Array.isArray(p.steps) || !p.outputs || !p.tasks) {
      throw new Error("manifest.portable needs inputs, steps, outputs and tasks");
    }
    this.inputs = p.inputs;
    this.tasks = p.tasks;
    this.outputs = p.outputs;
    this.stepNames = ["prior", ...p.steps.map((x) => `+${x}`)];
    this.steps = p.steps;
    this.masks = p.masks || null; // {modality: output name}: which modalities each row had
    const missing = [...p.inputs.map((i) => i.name).filter((x) => !session.inputNames.includes(x)),
                     ...Object.values(p.outputs).filter((x) => !session.outputNames.includes(x))];
    if (missing.length) throw new Error(`${p.file} has no tensor(s) ${missing.join(", ")} named by manifest.portable`);
  }

  /** Predict rows (objects {column: text, number or null}; absent keys are missing). One result per row:
   *  {<task>: value, steps: {<task>: [value after each of this.stepNames]}}, or {error, <task>: null, ...}. */
  async predict(rows) {
    const n = rows.length;
    if (!n) return [];
    const errors = new Array(n).fill("");
    const seen = new Array(n).fill(false);
    const feeds = {};
    for (const inp of this.inputs) {
      const values = rows.map((r) => (r != null && Object.hasOwn(r, inp.column) ? r[inp.column] : undefined));
      if (inp.type === "double") {
        const data = new Float64Array(n);
        const words = new Set(inp.missing || []); // text missing codes of this numeric column (canonical)
        values.forEach((v, i) => {
          const [f, problem] = words.size && words.has(canonicalCategory(v)) ? [NaN, null] : parseDouble(v);
          data[i] = f;
          if (problem) errors[i] ||= `column '${inp.column}': ${problem} (value ${JSON.stringify(v)})`;
          else if (!Number.isNaN(f)) seen[i] = true;
        });
        feeds[inp.name] = new this.ort.Tensor("float64", data, [n]);
      } else if (inp.type === "string") {
        const data = values.map(canonicalCategory);
        data.forEach((s, i) => { if (s !== "") seen[i] = true; });
        feeds[inp.name] = new this.ort.Tensor("string", data, [n]);
      } else {
        throw new Error(`manifest.portable input ${inp.name} has unknown type ${JSON.stringify(inp.type)}`);
      }
    }
    const res = await this.session.run(feeds);
    const S = this.stepNames.length;
    const out = rows.map(() => ({ steps: {}, used: [] }));
    if (this.masks) { // the graph's own presence per modality: unknown categories and missing codes count as missing
      seen.fill(false);
      for (const x of this.steps) { // in step order (the manifest's keys are sorted)
        res[this.masks[x]].data.forEach((m, i) => { if (m) { seen[i] = true; out[i].used.push(x); } });
      }
    }
    seen.forEach((present, i) => { if (!present && !errors[i]) errors[i] = "no value for any input column of the model"; });
    for (const [task, spec] of Object.entries(this.tasks)) {
      const t = res[this.outputs[task]];
      const k = t.dims[1];
      if (t.dims.length !== 2 || t.dims[0] !== S * n) {
        throw new Error(`output ${this.outputs[task]} has shape [${t.dims}], expected [${S * n}, k]`);
      }
      const value = (s, i) => (spec.kind === "multiclass" ? Array.from(t.data.subarray((s * n + i) * k, (s * n + i + 1) * k))
                               : spec.kind === "regression" ? t.data[(s * n + i) * k] * spec.std + spec.mean // label units
                               : t.data[(s * n + i) * k]);
      out.forEach((o, i) => {
        if (errors[i]) {
          o.used = [];
          o[task] = null;
          o.steps[task] = null;
          return;
        }
        o.steps[task] = Array.from({ length: S }, (_, s) => value(s, i));
        o[task] = o.steps[task][S - 1];
      });
    }
    out.forEach((o, i) => { if (errors[i]) o.error = errors[i]; });
    return out;
  }
}
