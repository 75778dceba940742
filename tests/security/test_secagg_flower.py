"""Secure aggregation through Flower's records and handlers: a ClientApp with ``secagg_mod`` and the
secagg query handlers, driven by ``SecAggRound`` over the in-process Grid."""
import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.secagg import register_handlers, secagg_mod
from mmn_fed import records as R
from mmn_fed.modules import module_of
from mmn_fed.secagg import MASKED, SECAGG
from server.aggregation import SiteUpdate, aggregate_modules
from server.engines.inprocess import InProcessGrid
from server.secagg import SecAggError, SecAggRound, plan_round

G = {"init_state": np.zeros(3, np.float32), "encoders.a.net.0.weight": np.zeros((2, 2), np.float32),
     "encoders.b.net.0.weight": np.zeros(4, np.float32), "decoders.y.0.weight": np.zeros(2, np.float32)}
SITES = {"A": ["init_state", "encoders.a", "decoders.y"], "B": ["init_state", "encoders.a", "encoders.b", "decoders.y"],
         "C": ["init_state", "encoders.b", "decoders.y"], "D": ["init_state", "encoders.a", "encoders.b", "decoders.y"]}


def local_update(site, params):
    rng = np.random.default_rng(ord(site))
    return ({k: (v + rng.normal(0, 1, v.shape)).astype(v.dtype) for k, v in params.items()},
            {m: 10 * (ord(site) - 60) + i for i, m in enumerate(sorted({module_of(k) for k in params}))})


def make_app(fail_train=()):
    app = ClientApp()
    register_handlers(app)

    @app.train(mods=[secagg_mod])
    def train(msg, ctx):
        site = ctx.node_config["site-name"]
        if site in fail_train:
            raise RuntimeError("site went down mid-round")
        new, counts = local_update(site, R.from_arrayrecord(msg.content["arrays"]))
        return Message(RecordDict({"arrays": R.to_arrayrecord(new), "counts": MetricRecord(counts),
                                   "metrics": MetricRecord({"train_loss": 1.0})}), reply_to=msg)
    return app


def secure_round(fail_train=(), spy=None):
    app = make_app(fail_train)
    grid = InProcessGrid(app, [{"site-name": s} for s in SITES], {})
    nodes = {n: ctx.node_config["site-name"] for n, ctx in grid.contexts.items()}
    plan = plan_round(G, SITES, 1)
    rnd = SecAggRound(grid, nodes, plan)
    extra = rnd.setup()
    msgs = []
    for n, s in nodes.items():
        content = RecordDict({"arrays": R.to_arrayrecord({k: v for k, v in G.items() if module_of(k) in SITES[s]})})
        if n in extra:
            content[SECAGG] = extra[n]
        msgs.append(Message(content, dst_node_id=n, message_type="train", group_id="1"))
    replies = list(grid.send_and_receive(msgs))
    if spy is not None:
        spy.extend(replies)
    return rnd.finish(replies), grid


def plaintext(sites):
    ups = []
    for s in sites:
        new, counts = local_update(s, {k: v for k, v in G.items() if module_of(k) in SITES[s]})
        ups.append(SiteUpdate(s, new, counts))
    return aggregate_modules(G, ups)


def test_secure_round_through_flower_messages_equals_plaintext():
    replies = []
    res, grid = secure_round(spy=replies)
    expected, totals = plaintext(SITES)
    got = res.averaged(G)
    for k in G:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6)
    assert res.counts == pytest.approx(totals)
    for r in replies:  # nothing in clear leaves a site: no parameters, no counts, only masked vectors
        assert set(r.content.keys()) == {"metrics", MASKED}
        assert all(r.content[MASKED][m].numpy().dtype == np.uint64 for m in r.content[MASKED].keys())
    assert all(SECAGG not in ctx.state for ctx in grid.contexts.values())  # round secrets deleted after step 4


def test_a_site_failing_its_training_drops_out_and_the_round_completes():
    res, _ = secure_round(fail_train=("C",))
    assert res.dropped == ["C"]
    expected, _ = plaintext(["A", "B", "D"])
    for k in G:
        np.testing.assert_allclose(res.averaged(G)[k], expected[k], atol=1e-6)


def test_too_many_failures_abort_the_round():
    with pytest.raises(SecAggError, match="threshold"):
        secure_round(fail_train=("A", "B", "C"))
