"""The key layout, without Redis (and one check of the slot function against Redis)."""

from __future__ import annotations

import redis
from hypothesis import given
from hypothesis import strategies as st

from cluster import keys
from tests.fixtures.redis_cluster import ClusterControl


def test_channel_keys_share_the_channel_slot() -> None:
    assert keys.channel_metas("team:w123") == "presence:ch:{team:w123}:metas"
    assert keys.topic("team:w123") == "presence:ch:{team:w123}:bus"
    assert keys.slot(keys.channel_metas("team:w123")) == keys.slot(keys.topic("team:w123"))


def test_user_node_and_churn_keys_are_tagged_by_their_entity() -> None:
    u = [keys.user_conns("alice"), keys.user_index("alice"), keys.user_seen("alice")]
    assert all("{alice}" in k for k in u)
    assert len({keys.slot(k) for k in u}) == 1
    n = [keys.node_lease("n1"), keys.node_metas("n1"), keys.node_conns("n1"),
         keys.node_sweep_metas("n1"), keys.node_sweep_conns("n1"), keys.node_sweep_lock("n1")]
    assert len({keys.slot(k) for k in n}) == 1 and len(set(n)) == len(n)
    c = [keys.churn_records("org"), keys.churn_scores("org")]
    assert len({keys.slot(k) for k in c}) == 1
    assert keys.REGISTRY == "presence:nodes"


def test_kinds_do_not_collide() -> None:
    assert keys.user_conns("x") != keys.node_conns("x")
    assert keys.channel_metas("x") != keys.user_index("x")


def test_known_slots() -> None:
    # Values given by Redis's CLUSTER KEYSLOT.
    assert keys.slot("foo") == 12182
    assert keys.slot("{user1000}.following") == keys.slot("{user1000}.followers")
    assert keys.slot("foo{}{bar}") == keys.slot("foo{}{bar}")
    assert keys.hash_tag("foo{}{bar}") == "foo{}{bar}"
    assert keys.hash_tag("foo{{bar}}zap") == "{bar"
    assert keys.hash_tag("a{b}c{d}") == "b"


@given(st.text(max_size=40))
def test_escaped_tags_are_never_empty_or_broken(name: str) -> None:
    key = keys.user_seen(name)
    tag = keys.hash_tag(key)
    assert tag and "{" not in tag and "}" not in tag
    assert keys.slot(key) == keys.slot(keys.user_index(name))


@given(st.text(max_size=20), st.text(max_size=20))
def test_distinct_names_give_distinct_keys(a: str, b: str) -> None:
    if a != b:
        assert keys.user_conns(a) != keys.user_conns(b)


@given(st.text(max_size=40))
def test_topic_name_inverts_topic(name: str) -> None:
    assert keys.topic_name(keys.topic(name)) == name


def test_topic_name_rejects_foreign_channels() -> None:
    assert keys.topic_name("other") is None
    assert keys.topic_name("presence:ch:{a}:metas") is None


def test_slot_matches_redis(redis_cluster_control: ClusterControl) -> None:
    names = ["team:w123", "churn:org9", "alice", "n-1{x}", ""]
    samples = [f(n) for n in names for f in (keys.topic, keys.user_seen, keys.node_lease)]
    with redis.Redis("127.0.0.1", redis_cluster_control.ports[0]) as c:
        for k in [*samples, "foo", keys.REGISTRY]:
            assert keys.slot(k) == c.execute_command("CLUSTER KEYSLOT", k), k
