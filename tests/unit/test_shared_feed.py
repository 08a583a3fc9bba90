"""The shared WebSocket mode's pure core: de-duplication, field unions, routing, the late subscriber's snapshot,
grace periods, renewals, restarts and errors, plus a random-run property over all of them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.shared.feed import Feed, FeedSettings, ToClients, ToUpstream, notice

STS_OK = json.dumps({"topic": "sts", "args": {"authenticated": True}})
STS_DOWN = json.dumps({"topic": "sts", "args": {"authenticated": False}})
HELLO = json.dumps({"topic": "system", "success": "user1", "isPaper": True})
ACT = json.dumps({"topic": "act", "args": {"accounts": ["DU1"]}})


def up(actions: list[Any]) -> list[str]:
    return [a.text for a in actions if isinstance(a, ToUpstream)]


def to(actions: list[Any], client: int) -> list[Any]:
    return [
        json.loads(a.text) if a.text.startswith("{") else a.text
        for a in actions
        if isinstance(a, ToClients) and client in a.clients
    ]


def tick(conid: int, **fields: str) -> str:
    return json.dumps({"topic": f"smd+{conid}", "conid": conid, "_updated": 1, **fields})


def ready_feed(**kw: Any) -> Feed:
    feed = Feed(FeedSettings(**kw))
    feed.upstream_opened()
    feed.from_upstream(HELLO, 0)
    feed.from_upstream(ACT, 0)
    feed.from_upstream(STS_OK, 0)
    return feed


def smd(conid: int, *fields: str) -> str:
    return f"smd+{conid}+" + json.dumps({"fields": list(fields)})


def test_join_replays_greeting_accounts_and_status() -> None:
    feed = ready_feed()
    got = to(feed.join(1), 1)
    assert [m["topic"] for m in got] == ["system", "act", "sts"]


def test_join_before_ready_gets_a_notice_and_ready_later() -> None:
    feed = Feed()
    assert to(feed.join(1), 1) == [{"topic": "gateway", "state": "connecting"}]
    feed.upstream_opened()
    out = feed.from_upstream(STS_OK, 0)
    assert {"topic": "gateway", "state": "ready"} in to(out, 1)


def test_one_upstream_subscription_for_many_clients() -> None:
    feed = ready_feed()
    sent: list[str] = []
    for client in range(10):
        feed.join(client)
        sent += up(feed.from_client(client, smd(265598, "31", "84"), 1))
    assert sent == ['smd+265598+{"fields":["31","84"]}']
    assert feed.snapshot()["subscribers"] == {"smd+265598": 10}
    assert feed.snapshot()["upstream_subscriptions"] == 1


def test_field_union_grows_and_shrinks_with_umd_first() -> None:
    feed = ready_feed()
    feed.join(1)
    feed.join(2)
    feed.from_client(1, smd(8314, "31"), 0)
    assert up(feed.from_client(2, smd(8314, "84", "31"), 0)) == ["umd+8314+{}", 'smd+8314+{"fields":["31","84"]}']
    assert up(feed.from_client(2, "umd+8314+{}", 0)) == ["umd+8314+{}", 'smd+8314+{"fields":["31"]}']
    feed.from_client(2, smd(8314, "84"), 0)
    assert up(feed.leave(2, 0)) == ["umd+8314+{}", 'smd+8314+{"fields":["31"]}']


def test_ticks_go_to_their_conid_only_with_each_clients_fields() -> None:
    feed = ready_feed()
    for client in (1, 2, 3):
        feed.join(client)
    feed.from_client(1, smd(100, "31"), 0)
    feed.from_client(2, smd(100, "31", "84"), 0)
    feed.from_client(3, smd(200, "31"), 0)
    out = feed.from_upstream(tick(100, **{"31": "10.5", "84": "10.4"}), 0)
    assert to(out, 1) == [{"topic": "smd+100", "conid": 100, "_updated": 1, "31": "10.5"}]
    assert to(out, 2) == [{"topic": "smd+100", "conid": 100, "_updated": 1, "31": "10.5", "84": "10.4"}]
    assert to(out, 3) == []
    only_bid = feed.from_upstream(tick(100, **{"84": "10.3"}), 0)
    assert to(only_bid, 1) == []  # nothing it asked for changed
    assert len([a for a in out if isinstance(a, ToClients)]) == 2  # one encoding per distinct field list


def test_identical_field_lists_share_one_frame_as_ibkr_sent_it() -> None:
    feed = ready_feed()
    for client in range(5):
        feed.join(client)
        feed.from_client(client, smd(100, "31", "84"), 0)
    text = tick(100, **{"31": "1"})
    out = feed.from_upstream(text, 0)
    assert out == [ToClients((0, 1, 2, 3, 4), text)]


def test_late_subscriber_gets_every_field_at_once() -> None:
    feed = ready_feed()
    feed.join(1)
    feed.from_client(1, smd(100, "31", "84", "86"), 0)
    feed.from_upstream(tick(100, **{"31": "1", "84": "0.9", "86": "1.1"}), 0)
    feed.from_upstream(tick(100, **{"31": "2"}), 0)
    feed.join(2)
    out = feed.from_client(2, smd(100, "31", "86"), 0)
    assert up(out) == []  # nothing new upstream: the union did not grow
    assert to(out, 2) == [{"topic": "smd+100", "conid": 100, "_updated": 1, "31": "2", "86": "1.1"}]


def test_last_unsubscribe_waits_for_the_grace_period() -> None:
    feed = ready_feed(unsubscribe_delay_s=5)
    feed.join(1)
    feed.from_client(1, smd(100, "31"), 0)
    assert up(feed.leave(1, 10)) == []
    assert feed.next_deadline() == 15
    assert up(feed.due(14.9)) == []
    feed.join(2)  # a reload within the grace period: no churn upstream
    assert up(feed.from_client(2, smd(100, "31"), 12)) == []
    feed.from_client(2, "umd+100+{}", 20)
    assert up(feed.due(25)) == ["umd+100+{}"]
    assert feed.snapshot()["upstream_subscriptions"] == 0


def test_zero_grace_unsubscribes_at_once() -> None:
    feed = ready_feed(unsubscribe_delay_s=0)
    feed.join(1)
    feed.from_client(1, smd(100, "31"), 0)
    assert up(feed.from_client(1, "umd+100+{}", 1)) == ["umd+100+{}"]


def test_renewal_before_ibkr_lets_it_lapse() -> None:
    feed = ready_feed(renew_s=600)
    feed.join(1)
    feed.from_client(1, smd(100, "31"), 0)
    assert up(feed.due(599)) == []
    assert up(feed.due(600)) == ['smd+100+{"fields":["31"]}']
    assert feed.next_deadline() == 1200


def test_restart_keeps_clients_notifies_and_resubscribes() -> None:
    feed = ready_feed()
    feed.join(1)
    feed.from_client(1, smd(100, "31"), 0)
    feed.from_client(1, "sor+{}", 0)
    assert to(feed.upstream_closed(), 1) == [{"topic": "gateway", "state": "restarting"}]
    assert feed.upstream_closed() == []  # told once
    assert up(feed.from_client(1, smd(200, "84"), 1)) == []  # not ready: remembered, not sent
    feed.upstream_opened()
    out = feed.from_upstream(STS_OK, 2)
    assert sorted(up(out)) == sorted(['smd+100+{"fields":["31"]}', 'smd+200+{"fields":["84"]}', "sor+{}"])
    assert to(out, 1)[-1] == {"topic": "gateway", "state": "ready"}


def test_brokerage_drop_resubscribes_when_back() -> None:
    feed = ready_feed()
    feed.join(1)
    feed.from_client(1, smd(100, "31"), 0)
    feed.from_upstream(STS_DOWN, 1)
    assert not feed.ready
    assert up(feed.from_upstream(STS_OK, 2)) == ['smd+100+{"fields":["31"]}']


def test_keepalives_are_answered_here_and_ibkrs_answers_dropped() -> None:
    feed = ready_feed()
    feed.join(1)
    assert to(feed.from_client(1, "tic", 3), 1)[0]["topic"] == "tic"
    assert to(feed.from_client(1, "ech+hb", 3), 1) == ["ech+hb"]
    assert feed.from_upstream(json.dumps({"topic": "tic", "alive": True}), 3) == []
    assert feed.from_upstream("ech+hb", 3) == []


def test_bad_commands_answer_the_sender_only() -> None:
    feed = ready_feed()
    feed.join(1)
    feed.join(2)
    for command in ("smd+abc+{}", 'smd+1+{"fields":[true]}', "smd+1+{not json", "xyz", "umd+x", "{}", "x" * 5000):
        out = feed.from_client(1, command, 0)
        assert to(out, 2) == [] and up(out) == []
        assert "error" in to(out, 1)[0], command


def test_other_topics_are_reference_counted() -> None:
    feed = ready_feed()
    feed.join(1)
    feed.join(2)
    assert up(feed.from_client(1, "sor+{}", 0)) == ["sor+{}"]
    assert up(feed.from_client(2, "sor+{}", 0)) == []
    orders = json.dumps({"topic": "sor", "args": [{"orderId": 1}]})
    assert feed.from_upstream(orders, 0) == [ToClients((1, 2), orders)]
    assert up(feed.from_client(1, "uor+{}", 0)) == []
    assert up(feed.from_client(2, "uor+{}", 0)) == ["uor+{}"]


def test_unsolicited_messages_go_to_everyone() -> None:
    feed = ready_feed()
    feed.join(1)
    feed.join(2)
    bulletin = json.dumps({"topic": "blt", "args": {"message": "maintenance"}})
    assert feed.from_upstream(bulletin, 0) == [ToClients((1, 2), bulletin)]
    heartbeat = json.dumps({"topic": "system", "hb": 1})
    feed.from_upstream(heartbeat, 0)
    feed.join(3)
    assert [m.get("success") for m in to(feed.join(3), 3) if m["topic"] == "system"] == ["user1"]


def test_too_many_subscriptions_are_refused() -> None:
    feed = ready_feed(max_subscriptions=2)
    feed.join(1)
    feed.from_client(1, smd(1, "31"), 0)
    feed.from_client(1, smd(2, "31"), 0)
    out = feed.from_client(1, smd(3, "31"), 0)
    assert up(out) == [] and "too many" in to(out, 1)[0]["error"]


def test_notice_shape() -> None:
    assert json.loads(notice("ready")) == {"topic": "gateway", "state": "ready"}


# ------------------------------------------------------------------------------------------------ random runs

FIELDS = ("31", "84", "86", "7295")
CLIENTS = st.integers(0, 2)
CONIDS = st.integers(1, 2)
step = st.one_of(
    st.tuples(st.just("join"), CLIENTS),
    st.tuples(st.just("leave"), CLIENTS),
    st.tuples(st.just("smd"), CLIENTS, CONIDS, st.sets(st.sampled_from(FIELDS), max_size=3)),
    st.tuples(st.just("umd"), CLIENTS, CONIDS),
    st.tuples(st.just("tick"), CONIDS, st.sets(st.sampled_from(FIELDS), min_size=1)),
    st.tuples(
        st.just("restart"),
    ),
    st.tuples(st.just("wait"), st.floats(0, 20)),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(step, max_size=60))
def test_random_runs_keep_upstream_equal_to_what_clients_want(steps: list[tuple[Any, ...]]) -> None:
    """Whatever happens, once grace periods pass: IBKR's subscriptions are exactly the wanted conids with the union of
    the wanted fields; no client ever gets a tick for a conid it did not subscribe to, nor a field it did not ask
    for; and every client receives each tick at most once."""
    feed = ready_feed(unsubscribe_delay_s=5)
    upstream: dict[int, tuple[str, ...]] = {}
    wanted: dict[int, dict[int, tuple[str, ...]]] = {}
    joined: set[int] = set()
    now = 0.0

    def apply(actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, ToUpstream):
                verb, _, rest = action.text.partition("+")
                conid_text, _, args = rest.partition("+")
                if verb == "umd":
                    upstream.pop(int(conid_text), None)
                elif verb == "smd":
                    upstream[int(conid_text)] = tuple(json.loads(args).get("fields", []))
            else:
                assert len(set(action.clients)) == len(action.clients)
                message = json.loads(action.text) if action.text.startswith("{") else {}
                topic = message.get("topic", "") if isinstance(message, dict) else ""
                if topic.startswith("smd+"):
                    conid = int(topic[4:])
                    for client in action.clients:
                        assert conid in wanted.get(client, {}), (client, conid)
                        asked = set(wanted[client][conid])
                        got = {k for k in message if k.isdigit() and k not in ("6119", "6509")}
                        assert not asked or got <= asked

    for item in steps:
        kind = item[0]
        if kind == "join" and item[1] not in joined:
            joined.add(item[1])
            apply(feed.join(item[1]))
        elif kind == "leave" and item[1] in joined:
            joined.discard(item[1])
            wanted.pop(item[1], None)
            apply(feed.leave(item[1], now))
        elif kind == "smd" and item[1] in joined:
            fields = tuple(sorted(item[3]))
            wanted.setdefault(item[1], {})[item[2]] = fields
            apply(feed.from_client(item[1], smd(item[2], *fields), now))
        elif kind == "umd" and item[1] in joined:
            wanted.get(item[1], {}).pop(item[2], None)
            apply(feed.from_client(item[1], f"umd+{item[2]}+{{}}", now))
        elif kind == "tick" and item[1] in upstream:
            apply(feed.from_upstream(tick(item[1], **dict.fromkeys(item[2], "1")), now))
        elif kind == "restart":
            apply(feed.upstream_closed())
            upstream.clear()
            apply(feed.upstream_opened())
            apply(feed.from_upstream(STS_OK, now))
        elif kind == "wait":
            now += item[1]
            apply(feed.due(now))
        check(upstream, wanted, exact=False)  # after every step: every wanted conid carries exactly its union
    apply(feed.due(now + 10))
    check(upstream, wanted, exact=True)  # and once grace periods pass, nothing else is subscribed


def check(upstream: dict[int, tuple[str, ...]], wanted: dict[int, dict[int, tuple[str, ...]]], *, exact: bool) -> None:
    expected: dict[int, set[str]] = {}
    empty: set[int] = set()
    for per_client in wanted.values():
        for conid, fields in per_client.items():
            expected.setdefault(conid, set()).update(fields)
            if not fields:
                empty.add(conid)
    if exact:
        assert set(upstream) == set(expected)
    for conid, union in expected.items():
        assert set(upstream[conid]) == (set() if conid in empty else union)


def test_batching_merges_a_conids_ticks_per_interval() -> None:
    feed = ready_feed(batch_interval_s=0.1)
    feed.join(1)
    feed.from_client(1, smd(100, "31", "84"), 0)
    assert feed.from_upstream(tick(100, **{"31": "1"}), 1.0) == []
    assert feed.from_upstream(tick(100, **{"31": "2", "84": "1.9"}), 1.05) == []
    assert feed.next_deadline() == pytest.approx(1.1)
    out = feed.due(1.1)
    assert to(out, 1) == [{"topic": "smd+100", "conid": 100, "_updated": 1, "31": "2", "84": "1.9"}]
    assert feed.due(1.3) == []  # nothing new: nothing sent
