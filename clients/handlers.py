"""The site's message handlers: summary, profile, train and evaluate (torch, pandas and the site's data).

``clients/app.py`` registers them on the ClientApp. They run wherever the site's messages are handled: in
the engine's process (in-process and Ray engines), or, on Flower's deployment engine, in the site's worker
(``clients/worker.py``), which imports this module once instead of once per message. They read only the
message and the context's node config, run config, run id and node id, and write nothing else back.
"""
from __future__ import annotations

import json

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from edge_runtime.preprocessing import Preprocessor
from edge_runtime.schema import Schema
from mmn_fed import protocol as P
from mmn_fed import records as R
from mmn_fed.model import ModelConfig
from mmn_fed.settings import SiteSettings

from . import cache
from .site import Site, site_source

_PREPS: dict[str, Preprocessor] = {}


def _site(context: Context) -> Site:
    """This node's site, kept for the run (``clients.cache``: rows, encoded tensors and model, freed by the next run)."""
    return cache.site(context)


def _prep(config: ConfigRecord) -> tuple[Preprocessor, str]:
    text = str(config["prep"])
    key = P.digest(text)
    if key not in _PREPS:
        _PREPS.clear()
        _PREPS[key] = Preprocessor.from_dict(json.loads(text))
    return _PREPS[key], key


def _unpack(msg: Message) -> tuple[ConfigRecord, SiteSettings]:
    torch.set_num_threads(1)  # tiny modules: one thread is fastest, and keeps engines bit-identical
    config = msg.content[P.CONFIG]
    return config, SiteSettings.from_config(config)  # one versioned, typed record (mmn_fed.settings)


def _correction(config: ConfigRecord) -> dict[str, str]:
    """The modalities the server asks this site to balance against the label ({} when none)."""
    return json.loads(str(config[P.CORRECTION])) if P.CORRECTION in config else {}


def _timeseries(config: ConfigRecord) -> Schema | None:
    """The time-series schema the server sends with a time-series model (None: a static table)."""
    return Schema.from_dict(json.loads(str(config[P.TIMESERIES]))) if P.TIMESERIES in config else None


def _site_record(site: Site) -> ConfigRecord:
    return ConfigRecord({"name": site.name, "rows": len(site.rows)})


def summary(msg: Message, context: Context) -> Message:
    """Mergeable preprocessing summary of this site's training rows. A site whose data cannot be used (file
    unreadable, no rows, a column of the schema missing, a value that does not parse) replies with its name
    and the reason instead (``P.SITE["error"]``): the server excludes it by name and the others federate."""
    config, settings = _unpack(msg)
    name = site_source(context.node_config, context.run_config).name
    try:
        site = _site(context)
        schema = Schema.from_dict(json.loads(str(config["schema"])))
        content = RecordDict({P.SUMMARY_RECORD: R.json_record(site.summary(schema, settings)),
                              P.AUDIT_RECORD: R.json_record(site.audit_counts(schema, settings))})
    except Exception as e:  # any failure to read or summarize the rows is this site's data problem
        return Message(RecordDict({P.SITE: ConfigRecord({"name": name, "rows": 0, "error": f"{type(e).__name__}: {e}"})}),
                       reply_to=msg)
    content[P.SITE] = ConfigRecord({"name": site.name, "rows": len(site.rows), "absent": ",".join(site.absent)})
    return Message(content, reply_to=msg)


def profile(msg: Message, context: Context) -> Message:
    """Samples per module this site can train (modalities present, tasks labelled)."""
    config, settings = _unpack(msg)
    site = _site(context)
    prep, key = _prep(config)
    counts = site.module_counts(prep, key, settings, ModelConfig.from_dict(json.loads(str(config["model-config"]))),
                                ts=_timeseries(config))
    return Message(RecordDict({P.SITE: _site_record(site), P.COUNTS: MetricRecord(counts)}), reply_to=msg)


def _evaluate(site: Site, config: ConfigRecord, settings: SiteSettings, params, server_round: int) -> list[dict]:
    """Tidy records of ``params`` (the global model after ``server_round``) on the site's validation rows."""
    prep, key = _prep(config)
    mc = ModelConfig.from_dict(json.loads(str(config["model-config"])))
    return site.evaluate(prep, key, mc, settings, params, {"model": mc.kind, "training": "federated",
                                                           "seed": settings.seed, "round": server_round},
                         _correction(config), ts=_timeseries(config))


def train(msg: Message, context: Context) -> Message:
    """Local epochs on the received modules only; reply with them, their counts and the loss. With
    ``evaluate-round`` in the config, first the received model's evaluation records (``P.RECORDS``): the
    previous round's federated evaluation, folded into this message."""
    config, settings = _unpack(msg)
    site = _site(context)
    prep, key = _prep(config)
    params = R.from_arrayrecord(msg.content[P.ARRAYS])
    content = RecordDict()
    if P.EVALUATE_ROUND in config:  # scored before training: the model as received
        content[P.RECORDS] = R.json_record(_evaluate(site, config, settings, params, int(config[P.EVALUATE_ROUND])))
    new, counts, metrics = site.train(prep, key, ModelConfig.from_dict(json.loads(str(config["model-config"]))),
                                      settings, params, int(config["server-round"]), _correction(config),
                                      ts=_timeseries(config))
    content.update({P.ARRAYS: R.to_arrayrecord(new), P.COUNTS: MetricRecord(counts),
                    P.METRICS: R.metric_record(metrics), P.SITE: _site_record(site)})
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the received modules on local validation rows, per task, as tidy records."""
    config, settings = _unpack(msg)
    site = _site(context)
    records = _evaluate(site, config, settings, R.from_arrayrecord(msg.content[P.ARRAYS]), int(config["server-round"]))
    flat = {f"{r['task']}/{r['metric']}": r["value"] for r in records if r["value"] is not None}
    flat.update({f"{r['task']}/n": r["n"] for r in records})
    content = RecordDict({P.METRICS: R.metric_record(flat), P.RECORDS: R.json_record(records), P.SITE: _site_record(site)})
    return Message(content, reply_to=msg)
