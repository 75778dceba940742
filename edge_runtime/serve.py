"""`mmn-edge serve`: a local HTTP service over one verified bundle, for clinic software. Standard library only.

    service = Service("bundle/", trust_keys=["keys/mmn-edge.pub"])
    server = make_server(service, ServeConfig(port=0))      # 127.0.0.1 by default
    server.serve_forever()

Endpoints (docs/edge.md, "Serving"): ``GET /`` the patient form, ``GET /health``, ``GET /info`` (model, release,
modalities, tasks, columns, drift), ``POST /predict`` (JSON patients -> predictions and the per-step
explanation), ``POST /admin/reload`` (verify the bundle directory again and swap it in without a restart).
Prediction goes through ``Bundle.predict``, the path `mmn-edge predict` uses. Patient values are never logged
or written to disk: the service keeps only aggregate counts and sums (``InputStats``).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bundle import Bundle, Predictions
from .preprocessing import DataError, parse_numeric
from .serve_page import finite as _finite
from .trust import BundleError, read_revocations, verify_bundle

log = logging.getLogger("mmn-edge.serve")

DEFAULT_MAX_BODY = 1024 * 1024  # bytes per request: ~5,000 patients of heart-sized rows
DEFAULT_MAX_CONCURRENT = 4  # requests in flight (one predicts, the others wait); more -> 503
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds: a connection's idle time, and the whole body's arrival
# longer JSON integers are refused naming the field: beyond 4300 digits int() raises inside the JSON decoder, and
# beyond ~308 digits the value is no float (OverflowError in prediction)
MAX_INT_DIGITS = 300


DRIFT_LIMIT_SD = 1e6  # drift statistics leave out numeric values further than this many training SDs from the mean

class ServeError(ValueError):  # a ValueError: `mmn-edge` exits 2 with the message
    """The service cannot start as configured (e.g. a non-loopback address without TLS and a token)."""


class RequestError(ValueError):
    """A request the service refuses: ``status`` (4xx) and the offending ``field``, both sent to the client."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


# ---- running statistics and drift ----------------------------------------------------------------------

class InputStats:
    """What the service has seen, as aggregates only: rows, rows per modality present, and per numeric column
    the count and sum of observed values. ``drift`` compares them with the training statistics of the manifest."""

    def __init__(self, bundle: Bundle):
        prep = bundle.preprocessor
        self._modalities = list(bundle.order)
        self._numeric = [c for c in prep.schema.input_columns if prep.columns[c]["kind"] == "numeric"]
        self._train = {c: prep.columns[c] for c in self._numeric}
        self._lock = threading.Lock()
        self.rows = 0
        self.present = {x: 0 for x in self._modalities}
        self.count = {c: 0 for c in self._numeric}
        self.sum = {c: 0.0 for c in self._numeric}

    def add(self, bundle: Bundle, table: dict[str, list], ok: np.ndarray, used: Sequence[str]) -> None:
        """Count the rows that were predicted (``ok``); ``used``: their modalities ('a+b')."""
        idx = np.flatnonzero(ok)
        if not len(idx):
            return
        sums = {}
        for c in self._numeric:
            if c in table:
                codes = bundle.schema.missing_codes.get(c, ())
                x, _ = parse_numeric([table[c][i] for i in idx], c, codes)
                st = self._train[c]
                # values beyond 1e6 training SDs (e.g. 1e308) would overflow the running sum: not counted
                x = x[np.isfinite(x) & (np.abs(x - st["mean"]) <= DRIFT_LIMIT_SD * st["std"])]
                sums[c] = (len(x), float(x.sum()))
        with self._lock:
            self.rows += len(idx)
            for i in idx:
                for x in used[i].split("+"):
                    if x in self.present:
                        self.present[x] += 1
            for c, (n, s) in sums.items():
                self.count[c] += n
                self.sum[c] += s

    def report(self) -> dict[str, Any]:
        """Missingness per modality, and per numeric column the mean seen against the training mean:
        ``shift_sd`` = (mean seen - training mean) / training std; ``z`` = the same over the standard error
        (std / sqrt(count seen)), large when the shift is unlikely to be chance."""
        with self._lock:
            rows, present = self.rows, dict(self.present)
            count, total = dict(self.count), dict(self.sum)
        columns = {}
        for c in self._numeric:
            st, n = self._train[c], count[c]
            entry: dict[str, Any] = {"seen": n, "train_mean": st["mean"], "train_std": st["std"]}
            if n:
                mean = total[c] / n
                shift = (mean - st["mean"]) / st["std"]
                entry.update(mean=mean, shift_sd=shift, z=shift * math.sqrt(n))
            columns[c] = entry
        return {"rows": rows,
                "missing": {x: (1.0 - present[x] / rows) if rows else None for x in self._modalities},
                "numeric": columns}


# ---- the service: a bundle, its trust, hot swap ---------------------------------------------------------

@dataclass
class Loaded:
    bundle: Bundle
    release: int
    stats: InputStats
    notices: list[str]


class Service:
    """The running model. ``reload`` verifies the bundle directory again and swaps it in atomically; requests
    in flight finish on the bundle they started with."""

    def __init__(self, path: str | Path, trust_keys: Any, revocations: str | Path | None = None,
                 allow_unsigned: bool = False):
        self.path = Path(path)
        self.trust_keys = trust_keys
        self.revocations = revocations
        self.allow_unsigned = allow_unsigned
        self._swap = threading.Lock()
        self._predict = threading.Lock()  # composed-session cache of a Bundle is not thread-safe
        self.current = self._load()
        self.loaded_at = time.time()

    def _load(self) -> Loaded:
        revoked = read_revocations(self.revocations) if self.revocations else frozenset()
        vb = verify_bundle(self.path, None if self.allow_unsigned and not self.trust_keys else self.trust_keys,
                           self.allow_unsigned, revoked)
        bundle = Bundle(vb)
        notices = []
        release = bundle.manifest.get("release")
        if release is None:
            release = 0
            notices.append("this bundle has no release number (exported before releases existed): treated as "
                           "release 0")
        elif isinstance(release, bool) or not isinstance(release, int) or release < 0:
            raise BundleError(f"manifest of {self.path} has release {release!r}; expected an integer >= 0")
        if bundle.manifest.get("timeseries"):
            # /predict takes one row per patient; a time-series model needs the patient's visits in order and a state
            # kept between them: refused here (at start and on reload) rather than answer from a single row
            raise BundleError(f"{self.path} is a time-series bundle: time-series bundles are not served. "
                              "`mmn-edge serve` takes bundles whose /predict input is one row per patient; score "
                              "visit tables with `mmn-edge predict` (--subjects for long tables) or "
                              "edge_runtime.streaming (see docs/timeseries.md)")
        return Loaded(bundle, release, InputStats(bundle), notices)

    def reload(self, force: bool = False) -> dict[str, Any]:
        """Verify the bundle directory again and swap it in. A lower release than the running one is refused
        unless ``force``. Raises UntrustedBundleError / BundleError (the running model stays)."""
        with self._swap:
            new = self._load()
            old = self.current
            if new.release < old.release and not force:
                raise BundleError(f"release {new.release} of {self.path} is lower than the running release "
                                  f"{old.release}; refusing to go back (POST {{\"force\": true}} to override)")
            self.current = new
            self.loaded_at = time.time()
        log.info("swapped model %s release %s -> model %s release %s", old.bundle.manifest.get("model_id"),
                 old.release, new.bundle.manifest.get("model_id"), new.release)
        return {"model_id": new.bundle.manifest.get("model_id"), "release": new.release,
                "previous": {"model_id": old.bundle.manifest.get("model_id"), "release": old.release},
                "notices": new.notices}

    # ---- the API's answers ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        cur = self.current
        b = cur.bundle
        d = b.describe()
        prep = b.preprocessor
        columns = {c: ({"kind": "numeric", "mean": prep.columns[c]["mean"], "std": prep.columns[c]["std"]}
                       if prep.columns[c]["kind"] == "numeric" else
                       {"kind": "categorical", "categories": list(prep.columns[c]["categories"])})
                   for c in b.schema.input_columns}
        return {"model_id": d["model_id"], "release": cur.release, "signed_by": d["signed_by"],
                "order": d["order"], "modalities": d["modalities"], "tasks": d["tasks"], "columns": columns,
                "model_card": b.manifest.get("model_card"), "notices": cur.notices,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                "drift": cur.stats.report()}

    def predict(self, body: Any) -> dict[str, Any]:
        """``{"patients": [{column: value, ...}, ...], "explain": true}`` (or ``"patient": {...}``) -> one
        result per patient, in order. Raises RequestError naming the field of a malformed request."""
        cur = self.current
        patients, explain = parse_request(body, cur.bundle)
        with self._predict:
            p = cur.bundle.predict(patients, explain=explain)
        table = {c: [r.get(c) for r in patients] for c in cur.bundle.schema.input_columns}
        cur.stats.add(cur.bundle, table, p.ok, p.used)
        notes = [n for n in p.notes if not n.startswith("input has no column")]  # subsets are the norm here
        return {"model_id": cur.bundle.manifest.get("model_id"), "release": cur.release,
                "results": results(p, explain), "notes": notes}


class HugeInt(str):
    """A JSON integer longer than ``MAX_INT_DIGITS`` digits (``int()`` refuses more than 4300, a float more than
    ~308): kept as its text so that ``parse_request`` can name the field it is in."""


def _parse_int(text: str) -> Any:
    return HugeInt(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def _huge(v: Any, at: str) -> RequestError:
    return RequestError(400, f"{at}: an integer of {len(v.lstrip('-'))} digits; at most {MAX_INT_DIGITS} "
                             f"are accepted", at)


def loads(raw: bytes) -> Any:
    """A request body as JSON. Raises RequestError 400 (field ``body``) for text that is not JSON, or nested too
    deeply; integers too long for ``int()`` become ``HugeInt``, refused by ``parse_request`` naming the field."""
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_parse_int) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}", "body") from None
    except RecursionError:
        raise RequestError(400, "the body is nested too deeply", "body") from None
    except ValueError as e:  # any other conversion the decoder refuses
        raise RequestError(400, f"the body is not valid JSON: {type(e).__name__}", "body") from None


def parse_request(body: Any, bundle: Bundle) -> tuple[list[dict[str, Any]], bool]:
    """Validate a /predict body at the boundary: its shape, every column name and every value's type (a numeric
    column takes a number, a numeric string or a missing value). Raises RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object with 'patients' (a list) or 'patient' (an object)")
    unknown_keys = sorted(set(body) - {"patients", "patient", "explain"})
    if unknown_keys:
        raise RequestError(400, f"unknown field(s) {unknown_keys}; expected 'patients' or 'patient', and 'explain'",
                           unknown_keys[0])
    if ("patients" in body) == ("patient" in body):
        raise RequestError(400, "give exactly one of 'patients' (a list of objects) or 'patient' (an object)",
                           "patients")
    explain = body.get("explain", True)
    if isinstance(explain, HugeInt):
        raise _huge(explain, "explain")
    if not isinstance(explain, bool):
        raise RequestError(400, f"'explain' must be true or false, got {type(explain).__name__}", "explain")
    patients = body["patients"] if "patients" in body else [body["patient"]]
    where = "patients" if "patients" in body else "patient"
    if not isinstance(patients, list) or not patients:
        raise RequestError(400, "'patients' must be a non-empty list of objects", "patients")
    schema = bundle.schema
    known = set(schema.input_columns)
    prep = bundle.preprocessor
    for i, row in enumerate(patients):
        at = f"{where}[{i}]" if where == "patients" else "patient"
        if not isinstance(row, dict):
            raise RequestError(400, f"{at} must be an object of column -> value, got {type(row).__name__}", at)
        for c, v in row.items():
            if isinstance(v, HugeInt):
                raise _huge(v, f"{at}.{c}")
            if c not in known:
                raise RequestError(400, f"{at}: unknown column '{c}'; the model's columns are "
                                        f"{ {x: list(cs) for x, cs in schema.modalities.items()} }", f"{at}.{c}")
            numeric = prep.columns[c]["kind"] == "numeric"
            if v is not None and not isinstance(v, (str, int, float)) or numeric and isinstance(v, bool):
                raise RequestError(400, f"{at}.{c}: expected {'a number' if numeric else 'a category (string)'} "
                                        f"or null, got {type(v).__name__}", f"{at}.{c}")
            if numeric:
                _, bad = parse_numeric([v], c, schema.missing_codes.get(c, ()))
                if bad:
                    raise RequestError(400, f"{at}.{c}: {bad[0].message} (column '{c}' is numeric), got {v!r}",
                                       f"{at}.{c}")
    return patients, explain


def _value(spec: dict[str, Any], v: Any) -> Any:
    if spec["kind"] == "multiclass":
        return {c: float(p) for c, p in zip(spec["classes"], v)}
    return float(v)


def results(p: Predictions, explain: bool) -> list[dict[str, Any]]:
    """One JSON object per row: ok, reason, warnings, modalities used, predictions per task and (explain) the
    prediction after the prior and after each modality the row has (the paper's cumulative prediction)."""
    out = []
    for i in range(len(p)):
        ok = bool(p.ok[i])
        r: dict[str, Any] = {"ok": ok, "reason": p.reasons[i] or None,
                             "warnings": [w for w in p.warnings[i].split("; ") if w],
                             "modalities": [x for x in p.used[i].split("+") if x]}
        if ok:
            r["predictions"] = {t: _value(s, p.values[t][i]) for t, s in p.tasks.items()}
            if explain and p.trajectory:
                r["explanation"] = [{"step": s.name, **{t: _value(spec, s.values[t][i]) for t, spec in p.tasks.items()}}
                                    for s in p.trajectory if s.name == "prior" or bool(s.applied[i])]
        out.append(r)
    return out


# ---- HTTP -----------------------------------------------------------------------------------------------

@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8750
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    host = _bare(host)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(cfg: ServeConfig) -> None:
    """Refuse an exposed service: any non-loopback address needs TLS and a token."""
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ServeError("--tls-cert and --tls-key go together")
    if not is_loopback(cfg.host):
        missing = [w for w, have in (("TLS (--tls-cert and --tls-key)", cfg.tls_cert), ("an access token "
                   "(--token-file)", cfg.token)) if not have]
        if missing:
            raise ServeError(f"refusing to listen on {cfg.host}, which is not a loopback address, without "
                             f"{' and '.join(missing)}: patient data would cross the network unprotected. "
                             f"Listen on 127.0.0.1 (the default) or give both")
    if cfg.max_body < 1 or cfg.max_concurrent < 1:
        raise ServeError("--max-body and --max-concurrent must be >= 1")
    if not (isinstance(cfg.request_timeout, (int, float)) and 0 < cfg.request_timeout <= 3600):
        raise ServeError("--request-timeout must be a number of seconds > 0 (at most 3600)")


def read_token(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise ServeError(f"token file not found: {p}")
    token = p.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise ServeError(f"the token in {p} is {len(token)} characters; use at least 16 (e.g. `openssl rand -hex 32`)")
    return token


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service: Service, cfg: ServeConfig):
        check_config(cfg)
        self.service = service
        self.cfg = cfg
        self.slots = threading.BoundedSemaphore(cfg.max_concurrent)
        host = _bare(cfg.host)
        # an IPv6 address (e.g. ::1) needs an AF_INET6 socket; names (localhost) and IPv4 addresses take AF_INET
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, cfg.port), Handler)
        if cfg.tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            # the handshake runs in the request's thread (first read), not in the accepting loop
            self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's fully qualified name (socket.getfqdn), which can wait on DNS
        # for seconds; the service does not use it
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request: Any, client_address: Any) -> None:
        # the default prints a traceback to stderr, whose frames could quote a patient's value: the kind only
        exc = sys.exc_info()[1]
        log.error("internal error on a connection: %s", type(exc).__name__ if exc else "unknown")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"{'https' if self.cfg.tls_cert else 'http'}://{host}:{port}"


def make_server(service: Service, cfg: ServeConfig) -> Server:
    return Server(service, cfg)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "mmn-edge"

    def setup(self) -> None:
        # seconds a connection may stay silent (headers, body, keep-alive): a slow or silent client does not
        # hold a thread forever. It holds no concurrency slot meanwhile: a slot is taken once the body is read
        self.timeout = self.server.cfg.request_timeout
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # path and status only: never a body or a value
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if ctype.startswith("text/html"):
            self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                                                        "style-src 'unsafe-inline'; connect-src 'self'")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(_finite(obj), allow_nan=False).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str, field: str | None = None) -> None:
        self.close_connection = True  # a refused request's body may be unread
        cur = self.server.service.current
        self._json(status, {"error": message, "field": field, "model_id": cur.bundle.manifest.get("model_id"),
                            "release": cur.release})

    def _authorized(self) -> bool:
        token = self.server.cfg.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        ok = given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token.encode())
        if not ok:
            self._error(401, "missing or wrong access token (Authorization: Bearer <token>)", "Authorization")
        return ok

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "a Content-Length header is required", "Content-Length")
        n = int(length)
        if n > self.server.cfg.max_body:
            self.close_connection = True  # the body is not read
            raise RequestError(413, f"the body is {n} bytes; this service takes at most {self.server.cfg.max_body} "
                                    f"(split the patients over several requests)", "Content-Length")
        return loads(self._read(n))

    def _read(self, n: int) -> bytes:
        """``n`` bytes of body, all within --request-timeout (a client trickling a byte at a time is cut off too)."""
        limit = self.server.cfg.request_timeout
        deadline = time.monotonic() + limit
        chunks, got = [], 0
        try:
            while got < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(n - got, 65536))
                if not chunk:
                    self.close_connection = True
                    raise RequestError(400, f"the body ended after {got} of {n} bytes", "body")
                chunks.append(chunk)
                got += len(chunk)
        except (TimeoutError, socket.timeout):
            self.close_connection = True
            raise RequestError(408, f"the body did not arrive within {limit:g} s ({got} of {n} bytes)",
                               "body") from None
        finally:
            try:
                self.connection.settimeout(limit)
            except OSError:
                pass
        return b"".join(chunks)

    def _internal(self, path: str, e: BaseException) -> None:
        # answer 500 and log the kind only: a message or a traceback could quote a patient's value
        if isinstance(e, (ConnectionError, TimeoutError)):  # the client went away or stalled: nothing to answer
            self.close_connection = True
            log.info("%s %s: connection lost (%s)", self.address_string(), path, type(e).__name__)
            return
        log.error("internal error on %s: %s", path, type(e).__name__)
        try:
            self._error(500, f"internal error ({type(e).__name__}); the service log has no details of the request")
        except Exception:  # noqa: BLE001 - the connection is gone or the answer cannot be built
            self.close_connection = True

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            self._get(path)
        except Exception as e:  # noqa: BLE001
            self._internal(path, e)

    def _get(self, path: str) -> None:
        if path == "/health":
            cur = self.server.service.current
            return self._json(200, {"status": "ok", "model_id": cur.bundle.manifest.get("model_id"),
                                    "release": cur.release})
        if path == "/":
            from .serve_page import page  # only when the page is asked for

            # with a token, the page holds nothing about the model: it asks for the token, then fetches /info
            token = self.server.cfg.token is not None
            return self._send(200, page(None if token else self.server.service.info()).encode(),
                              "text/html; charset=utf-8")
        if not self._authorized():
            return
        if path == "/info":
            return self._json(200, self.server.service.info())
        self._error(404, f"no such endpoint {path}; see GET /, /health, /info, POST /predict, /admin/reload")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            self._post(path)
        except Exception as e:  # noqa: BLE001
            self._internal(path, e)

    def _post(self, path: str) -> None:
        if not self._authorized():
            return
        if path not in ("/predict", "/admin/reload"):
            return self._error(404, f"no such endpoint {path}; POST goes to /predict or /admin/reload")
        if path == "/admin/reload" and self.server.cfg.token is None:
            return self._error(403, "reload is disabled: start the service with --token-file to enable "
                                    "POST /admin/reload", "Authorization")
        try:
            body = self._body()  # read before a slot is taken: a slow client holds no slot
        except RequestError as e:
            return self._error(e.status, str(e), e.field)
        if not self.server.slots.acquire(blocking=False):
            self.close_connection = True
            return self._error(503, "the service is saturated; retry shortly")
        try:
            if path == "/predict":
                self._json(200, self.server.service.predict(body))
            else:
                force = body.get("force", False) if isinstance(body, dict) else None
                if not isinstance(force, bool):
                    raise RequestError(400, "'force' must be true or false", "force")
                try:
                    self._json(200, self.server.service.reload(force=force))
                except BundleError as e:  # includes UntrustedBundleError: the running model stays
                    self._error(409, f"bundle refused, the running model stays: {e}", "bundle")
        except RequestError as e:
            self._error(e.status, str(e), e.field)
        except DataError as e:
            self._error(400, str(e))
        finally:
            self.server.slots.release()


_NO_SIGHUP = object()


def reload_on_sighup(service: Service) -> Any:
    """POSIX: SIGHUP reloads the bundle as POST /admin/reload does without ``force`` (verified again, a lower
    release refused), in a thread; the outcome is logged and a refused bundle leaves the running model.
    Returns the previous handler, or ``_NO_SIGHUP`` where there is no SIGHUP (Windows) or outside the main
    thread (signal handlers can only be set there)."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return _NO_SIGHUP

    def run() -> None:
        try:
            r = service.reload(force=False)
            log.warning("SIGHUP: reloaded, serving model %s release %s", r["model_id"], r["release"])
            for n in r["notices"]:
                log.warning("notice: %s", n)
        except BundleError as e:  # includes UntrustedBundleError
            log.error("SIGHUP: bundle refused, the running model stays (release %s): %s",
                      service.current.release, e)
        except Exception as e:  # noqa: BLE001 - e.g. the directory is being rewritten; the model stays
            log.error("SIGHUP: reload failed (%s: %s), the running model stays (release %s)",
                      type(e).__name__, e, service.current.release)

    return signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(target=run, daemon=True).start())


def serve(bundle: str | Path, trust_keys: Any, cfg: ServeConfig, revocations: str | Path | None = None,
          allow_unsigned: bool = False) -> None:
    """Verify the bundle, start the server and serve until interrupted (what `mmn-edge serve` runs)."""
    check_config(cfg)
    service = Service(bundle, trust_keys, revocations, allow_unsigned)
    server = make_server(service, cfg)
    cur = service.current
    for n in cur.notices:
        log.warning("notice: %s", n)
    previous = reload_on_sighup(service)
    hup = previous is not _NO_SIGHUP
    log.warning("serving model %s release %s (signed by %s) at %s%s", cur.bundle.manifest.get("model_id"),
                cur.release, cur.bundle.signed_by, server.url, " (SIGHUP reloads the bundle)" if hup else "")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if hup:
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)


__all__ = ["InputStats", "RequestError", "ServeConfig", "ServeError", "Server", "Service", "check_config",
           "loads", "make_server", "parse_request", "reload_on_sighup", "serve"]


