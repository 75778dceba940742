"""`mmn-edge`: verify, describe and run a bundle on CSV rows. Imports no torch, pandas or flwr.

Exit codes: 0 done (rows that could not be predicted are reported in the output's ``reason`` column and
on stderr), 2 bad input or usage, 3 bundle refused (untrusted, tampered, malformed).
"""
from __future__ import annotations

import argparse
import json
import sys


def _add_trust(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--trust-key", required=required, help="the signer's Ed25519 public key (PEM, from `mmn-fed keygen`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmn-edge", description="Run signed mmn-fed bundles on CPU (no torch).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict every row of a CSV; one output row per input row, in order")
    p.add_argument("bundle")
    p.add_argument("--input", required=True, help="CSV in the training data's format (header = column names)")
    p.add_argument("--output", required=True, help="CSV to write")
    p.add_argument("--subjects", help="time-series bundle reading a long table (id, time, variable, value): the subject "
                                      "table, one row per id with the static inputs")
    _add_trust(p)
    p.add_argument("--allow-unsigned", action="store_true", help="run without verifying the signature (hashes are still checked)")
    p.add_argument("--explain", action="store_true", help="add the prediction after every step (<task>@<step> columns)")
    p.add_argument("--keep", default="", help="comma-separated input columns to copy to the output (e.g. an id)")
    p.add_argument("--order", help="comma-separated modality order (default: the bundle's)")
    p.add_argument("--min-modalities", type=int, default=1, help="rows with fewer modalities present are not predicted")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per batch (bounds memory)")
    p.set_defaults(func=_predict)
    v = sub.add_parser("verify", help="check the signature and every file hash")
    v.add_argument("bundle")
    _add_trust(v, required=True)
    v.set_defaults(func=_verify)
    i = sub.add_parser("info", help="modalities, tasks, files, sizes, provenance (verified when --trust-key is given)")
    i.add_argument("bundle")
    _add_trust(i)
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_info)
    s = sub.add_parser("serve", help="a local HTTP service (JSON API and a patient form) over a verified bundle")
    s.add_argument("bundle", help="bundle directory; POST /admin/reload (or SIGHUP) verifies it again and swaps it in")
    s.add_argument("--trust-key", action="append", default=[], help="a signer's public key, or a directory of them "
                                                                     "(*.pub, *.pem); repeat to trust several")
    s.add_argument("--revoked", help="revocation list: key ids (16 hex digits) refused even if trusted, one a line")
    s.add_argument("--allow-unsigned", action="store_true", help="serve an unsigned bundle (hashes are still checked)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on; any non-loopback one requires "
                                                        "--tls-cert, --tls-key and --token-file")
    s.add_argument("--port", type=int, default=8750)
    s.add_argument("--tls-cert", help="PEM certificate (chain) for HTTPS")
    s.add_argument("--tls-key", help="PEM private key of --tls-cert")
    s.add_argument("--token-file", help="file holding the access token (Authorization: Bearer <token>)")
    s.add_argument("--max-body", type=int, default=1024 * 1024, help="largest request body in bytes (413 above)")
    s.add_argument("--max-concurrent", type=int, default=4, help="requests in flight (503 above)")
    s.add_argument("--request-timeout", type=float, default=10.0,
                   help="seconds a connection may stay silent, and for a whole request body to arrive (408 after)")
    s.set_defaults(func=_serve)
    return parser


def _serve(args) -> int:
    import logging

    from .serve import ServeConfig, read_token, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not args.trust_key and not args.allow_unsigned:
        raise ValueError("pass --trust-key (the signer's public key; repeat for several) or --allow-unsigned")
    cfg = ServeConfig(host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
                      token=read_token(args.token_file) if args.token_file else None, max_body=args.max_body,
                      max_concurrent=args.max_concurrent, request_timeout=args.request_timeout)
    serve(args.bundle, args.trust_key or None, cfg, revocations=args.revoked, allow_unsigned=args.allow_unsigned)
    return 0


def _predict(args) -> int:
    from .bundle import load_bundle
    from .schema import SchemaError

    bundle = load_bundle(args.bundle, trust_key=args.trust_key, allow_unsigned=args.allow_unsigned)
    if bundle.signed_by is None:
        from .bundle import UNVERIFIED_NOTE

        print(f"warning: {UNVERIFIED_NOTE}", file=sys.stderr)
    keep = [k.strip() for k in args.keep.split(",") if k.strip()]
    if bundle.manifest.get("timeseries"):  # a visit or long table: one output row per (id, step) (docs/timeseries.md)
        from .streaming import Stream, predict_table

        s = predict_table(Stream(bundle), args.input, args.output, keep=keep, subjects=args.subjects)
        read = f"{s['rows']} input row(s)" + (f" and {s['subject_rows']} subject row(s)" if args.subjects else "")
        print(f"wrote {s['steps']} row(s) for {s['subjects']} subject(s) from {read} to "
              f"{args.output}: {s['predicted']} predicted" + (f", {s['errors']} error row(s) (see the reason "
                                                                     "column)" if s["errors"] else ""), file=sys.stderr)
        for problem in s["problems"]:
            print(f"  {problem}", file=sys.stderr)
        return 0
    if args.subjects:
        raise SchemaError("--subjects goes with a time-series bundle that reads a long table; this bundle scores one "
                          "row per subject")
    order = [m.strip() for m in args.order.split(",")] if args.order else None
    s = bundle.predict_csv(args.input, args.output, explain=args.explain, order=order, chunk_size=args.chunk_size,
                           min_modalities=args.min_modalities, keep=keep)
    print_summary(s, args.output)
    return 0


def print_summary(s: dict, output: str, model: str = "") -> None:
    """What a predict command tells the user on stderr (also ``mmn-fed predict``'s): notes, counts, first problems."""
    for note in s.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    failed = s["rows"] - s["predicted"]
    print(f"wrote {s['rows']} row(s) to {output}{f' (model {model})' if model else ''}: {s['predicted']} predicted"
          + (f", {failed} not predicted (see the reason column)" if failed else ""), file=sys.stderr)
    for problem in s["problems"]:
        print(f"  {problem}", file=sys.stderr)


def _verify(args) -> int:
    from .bundle import validate_manifest
    from .trust import verify_bundle

    vb = verify_bundle(args.bundle, trust_key=args.trust_key)
    validate_manifest(vb.manifest, vb.path)  # signed but malformed is not OK
    print(f"OK: {args.bundle} signed by key {vb.signed_by}; {len(vb.files)} file(s) match their sha256 "
          f"(model {vb.manifest.get('model_id')})")
    return 0


def _info(args) -> int:
    if args.trust_key:
        from .bundle import Bundle
        from .trust import verify_bundle

        d = Bundle(verify_bundle(args.bundle, trust_key=args.trust_key)).describe()
        d["verified"] = True
    else:
        from .bundle import validate_manifest
        from .trust import read_manifest

        m, _, sig = read_manifest(args.bundle)
        prep = validate_manifest(m, args.bundle)
        dims = prep.modality_dims
        d = {"model_id": m.get("model_id"), "format_version": m.get("format_version"), "signed": sig is not None,
             "verified": False,
             "modalities": {x: {"columns": list(prep.schema.modalities[x]), "features": dims[x]} for x in m["order"]},
             "order": m["order"],
             "tasks": {t: {k: v for k, v in s.items() if k in ("kind", "classes")} for t, s in m["tasks"].items()},
             "files": {f: e["bytes"] for f, e in m["files"].items()},
             "total_bytes": sum(e["bytes"] for e in m["files"].values()), "opset": m.get("opset"),
             "provenance": m.get("provenance", {}), "model_card": m.get("model_card"),
             "portable": "portable" in m}
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"bundle {args.bundle}  model {d['model_id']}  format v{d['format_version']}  opset {d['opset']}")
    if d.get("verified"):
        print(f"verified: signature by key {d.get('signed_by')} and every file hash")
    else:
        print(f"NOT verified ({'signed' if d.get('signed') else 'unsigned'}); pass --trust-key to verify")
    print("modalities (applied in this order):")
    for x, spec in d["modalities"].items():
        print(f"  {x:<16} {spec['features']:>3} features from {', '.join(spec['columns'])}")
    print("tasks:")
    for t, spec in d["tasks"].items():
        extra = f" classes {spec['classes']}" if spec["kind"] == "multiclass" else ""
        print(f"  {t:<16} {spec['kind']}{extra}")
    print("portable: " + ("yes (portable.onnx: preprocessing inside the graph, for any ONNX Runtime host)"
                          if d["portable"] else "no (re-export with a current `mmn-fed export` to run it on other hosts)"))
    print(f"files: {len(d['files'])}, {d['total_bytes'] / 1024:.1f} KiB")
    for f, n in d["files"].items():
        print(f"  {f:<36} {n:>8} B")
    print("provenance: " + json.dumps(d["provenance"]))
    if d.get("model_card"):
        print("model card:")
        for k, v in d["model_card"].items():
            print(f"  {k}: {v if isinstance(v, str) else json.dumps(v)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from .preprocessing import DataError
    from .schema import SchemaError
    from .trust import BundleError

    try:
        return int(args.func(args) or 0)
    except BundleError as e:
        print(f"mmn-edge {args.command}: bundle refused: {e}", file=sys.stderr)
        return 3
    except (DataError, SchemaError, FileNotFoundError, ValueError) as e:
        print(f"mmn-edge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
