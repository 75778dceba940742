"""Export a trained MultiModN to a signed edge bundle, and make signing keys.

    mmn-fed keygen --out keys/                      # keys/mmn-edge.key (private, 0600), keys/mmn-edge.pub
    mmn-fed export runs/heart/model.pt --out bundle/ --sign-key keys/mmn-edge.key
    mmn-edge predict bundle/ --trust-key keys/mmn-edge.pub --input rows.csv --output preds.csv

One ONNX file per module (``init_state``, ``encoders.<modality>``, ``decoders.<task>``), so one module can
be replaced alone; every tensor name inside a file is prefixed with its module name so the runtime can
splice modules into one graph without renaming. The manifest format lives in ``edge_runtime.trust``.
Two more graphs make the bundle portable (edge_runtime/portable.py): ``preprocess.onnx``, the preprocessing from
raw columns, and, for a static model, ``portable.onnx``, the whole model from raw columns for any ONNX Runtime
host (manifest key ``portable``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_runtime.bundle import compose_portable
from edge_runtime.compose import ModuleGraph, ModuleIO
from edge_runtime.portable import PORTABLE, PREPROCESS, input_spec, preprocess_graph, preprocess_module
from edge_runtime.trust import FORMAT, FORMAT_VERSION, MANIFEST, SIGNATURE, canonical_json, key_id, sha256

from .model import MultiModN
from .model_io import TrainedModel, load_model
from .modules import INIT_STATE, decoder_module, encoder_module

DEFAULT_OPSET = 17


class ExportError(ValueError):
    """The model cannot be exported (not a MultiModN, or an exported module disagrees with PyTorch)."""


# ---- keys -------------------------------------------------------------------------------------------

def generate_keypair(out_dir: str | Path, name: str = "mmn-edge", force: bool = False) -> tuple[Path, Path]:
    """Write an Ed25519 key pair: ``<name>.key`` (PKCS#8 PEM, owner-only) and ``<name>.pub`` (PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    if not force and (priv_path.exists() or pub_path.exists()):
        raise ExportError(f"{priv_path} or {pub_path} exists; pass --force to overwrite the key pair")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(priv_path, 0o600)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_private_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"signing key not found: {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ExportError(f"{path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ExportError(f"{path} holds a {type(key).__name__}; bundles are signed with Ed25519 (mmn-fed keygen)")
    return key


def sign_bundle(bundle_dir: str | Path, private_key) -> str:
    """(Re)sign a bundle's manifest.json; returns the signer's key id."""
    root = Path(bundle_dir)
    raw = (root / MANIFEST).read_bytes()
    (root / SIGNATURE).write_bytes(private_key.sign(raw))
    return key_id(private_key.public_key())


# ---- modules -> ONNX --------------------------------------------------------------------------------

class _Encoder(nn.Module):
    def __init__(self, enc: nn.Module):
        super().__init__()
        self.enc = enc

    def forward(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.enc(state, x)


def _torch_to_onnx(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], opset: int):
    import onnx

    buf = io.BytesIO()
    axes = {n: {0: "batch"} for n in inputs + outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript exporter: ~0.1 s per module (the dynamo exporter takes ~5 s)
            torch.onnx.export(module, args, buf, dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
            return onnx.load_from_string(buf.getvalue())
        except Exception:  # noqa: BLE001 - fall back to the dynamo exporter where TorchScript is gone
            batch = torch.export.Dim("batch", min=1)
            prog = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                     dynamic_shapes=tuple({0: batch} for _ in args), opset_version=opset)
            return prog.model_proto


def _init_state_onnx(value: np.ndarray, opset: int, ir_version: int):
    from onnx import TensorProto, helper, numpy_helper

    s = value.shape[-1]
    p = INIT_STATE + "."
    graph = helper.make_graph(
        [helper.make_node("Concat", [p + "batch", p + "width"], [p + "shape"], name=p + "concat", axis=0),
         helper.make_node("Expand", [p + "value", p + "shape"], [p + "state"], name=p + "expand")],
        "init_state",
        [helper.make_tensor_value_info(p + "batch", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info(p + "state", TensorProto.FLOAT, ["batch", s])],
        [numpy_helper.from_array(value.reshape(1, s).astype(np.float32), p + "value"),
         numpy_helper.from_array(np.array([s], dtype=np.int64), p + "width")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version,
                             producer_name="mmn-fed")


def _check(model_bytes: bytes, feed: dict[str, np.ndarray], expected: np.ndarray, what: str) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, feed)[0]
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-5, rtol=1e-4):
        raise ExportError(f"exported {what} disagrees with PyTorch (max abs diff "
                          f"{np.max(np.abs(got - expected)) if got.shape == expected.shape else 'shape ' + str(got.shape)})")


def export_modules(model: MultiModN, dims: dict[str, int], opset: int = DEFAULT_OPSET) -> dict[str, dict[str, Any]]:
    """{module name: {"onnx": bytes, "inputs": [...], "outputs": [...], "shapes": {...}}}, each checked
    against PyTorch on random inputs."""
    import onnx

    model = model.eval()
    s = int(model.init_state.shape[0])
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, Any]] = {}
    ir_version = None
    with torch.no_grad():
        for m in model.modalities:
            name = encoder_module(m)
            state, x = torch.randn(3, s, generator=gen), torch.randn(3, dims[m], generator=gen)
            expected = model.encoders[m](state, x).numpy()
            # eval(): the exporter restores the wrapper's training mode on its children afterwards
            proto = _torch_to_onnx(_Encoder(model.encoders[m]).eval(), (state, x), ["state", "x"], ["new_state"], opset)
            proto = onnx.compose.add_prefix(proto, name + ".")
            ir_version = proto.ir_version
            data = proto.SerializeToString()
            _check(data, {f"{name}.state": state.numpy(), f"{name}.x": x.numpy()}, expected, name)
            out[name] = {"onnx": data, "inputs": [f"{name}.state", f"{name}.x"], "outputs": [f"{name}.new_state"],
                         "shapes": {f"{name}.state": ["batch", s], f"{name}.x": ["batch", dims[m]],
                                    f"{name}.new_state": ["batch", s]}, "modality": m}
        for t in model.tasks:
            name = decoder_module(t)
            dec = model.decoders[t]
            state = torch.randn(3, s, generator=gen)
            expected = dec(state).numpy()
            proto = onnx.compose.add_prefix(_torch_to_onnx(dec, (state,), ["state"], ["logits"], opset), name + ".")
            data = proto.SerializeToString()
            _check(data, {f"{name}.state": state.numpy()}, expected, name)
            out[name] = {"onnx": data, "inputs": [f"{name}.state"], "outputs": [f"{name}.logits"],
                         "shapes": {f"{name}.state": ["batch", s], f"{name}.logits": ["batch", int(expected.shape[1])]},
                         "task": t}
        value = model.init_state.detach().numpy()
        data = _init_state_onnx(value, opset, ir_version or 8).SerializeToString()
        _check(data, {"init_state.batch": np.array([2], dtype=np.int64)}, np.tile(value, (2, 1)), INIT_STATE)
        out = {INIT_STATE: {"onnx": data, "inputs": ["init_state.batch"], "outputs": ["init_state.state"],
                            "shapes": {"init_state.batch": [1], "init_state.state": ["batch", s]}}, **out}
    return out


# ---- model card -------------------------------------------------------------------------------------

CARD_FIELDS = {"intended_use": "who and what the model is for", "training_sites": "sites and their sizes",
               "metrics": "test metrics with confidence intervals", "missingness_audit": "the missingness audit",
               "limits": "known limits and where not to use it", "contact": "who answers for the model"}


def load_model_card(card: Any) -> dict[str, Any]:
    """A model card from a TOML or JSON file, or a mapping: the fields of ``CARD_FIELDS`` (``intended_use`` and
    ``limits`` required), each text or JSON data. It goes into the signed manifest as ``model_card``."""
    if isinstance(card, (str, Path)):
        path = Path(card)
        if not path.is_file():
            raise FileNotFoundError(f"model card not found: {path}")
        try:
            if path.suffix == ".json":
                card = json.loads(path.read_text(encoding="utf-8"))
            else:
                import tomllib

                card = tomllib.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # JSONDecodeError and TOMLDecodeError
            kind = "JSON" if path.suffix == ".json" else "TOML"
            raise ExportError(f"model card {path} is not valid {kind}: {e}") from None
    if not isinstance(card, dict):
        raise ExportError(f"a model card is a table of fields, got {type(card).__name__}")
    unknown = sorted(set(card) - set(CARD_FIELDS))
    if unknown:
        raise ExportError(f"model card field(s) {unknown} are not known; the fields are {list(CARD_FIELDS)}")
    missing = [k for k in ("intended_use", "limits") if not card.get(k)]
    if missing:
        raise ExportError(f"model card has no {missing}: say {', '.join(CARD_FIELDS[k] for k in missing)}")
    try:
        canonical_json(card)
    except (TypeError, ValueError) as e:
        raise ExportError(f"model card holds a value JSON cannot carry: {e}") from None
    return {k: card[k] for k in CARD_FIELDS if k in card}


# ---- bundle -----------------------------------------------------------------------------------------

def export_bundle(trained: TrainedModel | str | Path, out_dir: str | Path, sign_key: Any = None,
                  force: bool = False, opset: int = DEFAULT_OPSET, release: int = 1,
                  model_card: Any = None) -> Path:
    """Write a bundle directory: manifest.json (+ manifest.sig when ``sign_key`` is a key path or an
    Ed25519 private key) and one ONNX file per module. ``release``: the signed release number (an integer >= 1
    that a serving device refuses to go back from, see docs/edge.md). ``model_card``: a TOML/JSON file or a
    mapping (``load_model_card``), signed with the manifest. Returns the directory."""
    if isinstance(release, bool) or not isinstance(release, int) or release < 1:
        raise ExportError(f"release must be an integer >= 1, got {release!r}")
    card = load_model_card(model_card) if model_card is not None else None
    source_sha = None
    if isinstance(trained, (str, Path)):
        source_sha = sha256(Path(trained).read_bytes()) if Path(trained).is_file() else None
        trained = load_model(trained)
    model = trained.model
    if trained.config.kind == "pfusion" and trained.metadata.get("timeseries_schema"):
        raise ExportError(f"a P-Fusion time-series model (window of {trained.config.pfusion_window} steps) is not "
                          "exported to edge bundles: a clinic device would have to keep each variable's last values "
                          "over the window instead of a MultiModN state, which the edge runtime does not do. Export a "
                          "MultiModN time-series model (model = \"multimodn\")")
    if not isinstance(model, MultiModN):
        raise ExportError(f"only MultiModN models are modular and can be exported; this is a {type(model).__name__}")
    recalibrated = [t for t, st in trained.preprocessor.targets.items() if st.get("calibration")]
    if recalibrated:  # the edge decoders output the training calibration: refuse rather than silently drop the map
        raise ExportError(f"this model was recalibrated at a site (task(s) {recalibrated}, `mmn-fed evaluate "
                          "--recalibrate`); edge bundles do not carry a recalibration: export the original model")
    key = load_private_key(sign_key) if isinstance(sign_key, (str, Path)) else sign_key
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} is not empty; pass --force to replace the bundle in it")
        for p in out.iterdir():  # only what a bundle holds: leave anything else alone
            if p.is_file() and (p.suffix == ".onnx" or p.name in (MANIFEST, SIGNATURE)):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    prep = trained.preprocessor
    modules = export_modules(model, prep.modality_dims, opset)
    files, manifest_modules = {}, {}
    for name, spec in modules.items():
        fname = f"{name}.onnx"
        (out / fname).write_bytes(spec["onnx"])
        files[fname] = {"sha256": sha256(spec["onnx"]), "bytes": len(spec["onnx"])}
        entry = {"file": fname, "inputs": spec["inputs"], "outputs": spec["outputs"], "shapes": spec["shapes"],
                 "opset": opset}
        for k in ("modality", "task"):
            if k in spec:
                entry[k] = spec[k]
        manifest_modules[name] = entry
    tasks = {t: dict(prep.targets[t]) for t in model.tasks}
    timeseries = trained.metadata.get("timeseries_schema")  # a time-series model (mmn_fed.sequences)
    # preprocessing as a graph (edge_runtime/portable.py), and for a static model the whole model from raw columns
    order = list(model.modalities)
    pre = preprocess_graph(prep, order, opset)
    graphs = {PREPROCESS: pre}
    if not timeseries:
        ios = {name: ModuleIO(ModuleGraph.parse(spec["onnx"]), tuple(spec["inputs"]), tuple(spec["outputs"]))
               for name, spec in modules.items()}
        graphs["portable"] = compose_portable(preprocess_module(pre, order), ios, order, tasks)
    for name, data in graphs.items():
        fname = f"{name}.onnx"
        (out / fname).write_bytes(data)
        files[fname] = {"sha256": sha256(data), "bytes": len(data)}
    spec_in = input_spec(prep, order)
    manifest_modules[PREPROCESS] = {"file": f"{PREPROCESS}.onnx", "inputs": [e["name"] for e in spec_in],
                                    "outputs": [n for x in order for n in (f"x.{x}", f"mask.{x}")], "opset": opset}
    portable = None if timeseries else {
        "file": PORTABLE, "inputs": spec_in, "steps": order, "outputs": {t: f"out.{t}" for t in tasks},
        "masks": {x: f"mask.{x}" for x in order},
        "tasks": {t: {k: v for k, v in s.items() if k in ("kind", "classes", "mean", "std")} for t, s in tasks.items()},
        "layout": "out.<task>: (1 + len(steps)) * rows x k, the prediction after the prior and after each step, "
                  "step-major; binary p(1), multiclass probabilities, regression standardized (x std + mean); "
                  "mask.<modality>: rows x 1, true where the row has the modality (the step applied)"}
    identity = {"files": {f: e["sha256"] for f, e in files.items()}, "preprocessing": prep.to_dict(), "tasks": tasks,
                **({"timeseries": timeseries} if timeseries else {})}
    import onnx

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": sha256(canonical_json(identity))[:16],
        "release": release,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": {**dict(trained.metadata.get("provenance", {})), "source_model_sha256": source_sha,
                       "exporter": f"mmn-fed {_version()}", "torch": torch.__version__, "onnx": onnx.__version__},
        "model_config": trained.config.to_dict(),
        "preprocessing": prep.to_dict(),
        "order": list(model.modalities),
        "state_size": int(model.init_state.shape[0]),
        "tasks": tasks,
        "opset": opset,
        "modules": manifest_modules,
        "files": files,
        **({"timeseries": timeseries} if timeseries else {}),
        **({"portable": portable} if portable else {}),
        **({"model_card": card} if card else {}),
    }
    (out / MANIFEST).write_bytes(canonical_json(manifest))
    sig = out / SIGNATURE
    if key is not None:
        sign_bundle(out, key)
    elif sig.exists():
        sig.unlink()
    return out


def _version() -> str:
    from . import __version__

    return __version__


# ---- CLI --------------------------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser("export", help="export a trained MultiModN to a signed edge bundle (one ONNX file per module)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model file written by `mmn-fed train` (model.pt)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--sign-key", help="Ed25519 private key (from `mmn-fed keygen`); without it the bundle is unsigned")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--force", action="store_true", help="replace a bundle already in --out")
    p.add_argument("--release", type=int, default=1, help="release number, signed in the manifest; a serving device "
                                                          "refuses a lower one than it runs")
    p.add_argument("--model-card", help="TOML or JSON model card (intended_use, training_sites, metrics, "
                                        "missingness_audit, limits, contact), signed into the manifest")
    p.set_defaults(func=_export)
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    k.add_argument("--out", required=True, help="directory for <name>.key (private) and <name>.pub")
    k.add_argument("--name", default="mmn-edge")
    k.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    k.set_defaults(func=_keygen)


def _export(args) -> int:
    torch.set_num_threads(1)
    out = export_bundle(args.model, args.out, args.sign_key, force=args.force, opset=args.opset,
                        release=args.release, model_card=args.model_card)
    manifest = json.loads((out / MANIFEST).read_text())
    size = sum(e["bytes"] for e in manifest["files"].values()) + (out / MANIFEST).stat().st_size
    print(json.dumps({"bundle": str(out), "model_id": manifest["model_id"],
                      "release": manifest["release"], "signed": (out / SIGNATURE).exists(),
                      "modules": list(manifest["modules"]), "bytes": size}, indent=1))
    return 0


def _keygen(args) -> int:
    priv, pub = generate_keypair(args.out, args.name, args.force)
    from edge_runtime.trust import load_public_key

    print(json.dumps({"private_key": str(priv), "public_key": str(pub), "key_id": key_id(load_public_key(pub))}, indent=1))
    print(f"keep {priv} secret; give {pub} to the sites that run the bundle", flush=True)
    return 0
