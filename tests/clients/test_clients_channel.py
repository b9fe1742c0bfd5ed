"""ChannelConfig: replica lists, balancing, keepalive and message-size options, the bearer token."""

from __future__ import annotations

import pytest

from polyhead.clients import ChannelConfig


def test_replica_lists_become_ip_uris_with_round_robin() -> None:
    cfg = ChannelConfig("127.0.0.1:5001, 127.0.0.1:5002")
    assert cfg.grpc_target == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert ("grpc.lb_policy_name", "round_robin") in cfg.options()
    assert ChannelConfig("[::1]:5001,[::1]:5002").grpc_target == "ipv6:[::1]:5001,[::1]:5002"
    assert ChannelConfig("ipv4:10.0.0.1:1,10.0.0.2:1").grpc_target == "ipv4:10.0.0.1:1,10.0.0.2:1"


def test_single_targets_pass_through_and_keep_grpcs_default_policy() -> None:
    for target in ("localhost:50051", "dns:///polyhead.svc:50051", "unix:///tmp/polyhead.sock"):
        cfg = ChannelConfig(target)
        assert cfg.grpc_target == target
        assert not any(name == "grpc.lb_policy_name" for name, _ in cfg.options())
    dns = ChannelConfig("dns:///polyhead.svc:50051", lb_policy="round_robin")
    assert ("grpc.lb_policy_name", "round_robin") in dns.options()


def test_host_names_in_a_replica_list_are_refused_with_the_alternative() -> None:
    with pytest.raises(ValueError, match="dns:///NAME:PORT"):
        ChannelConfig("a.example:1,b.example:1")


def test_options_and_token() -> None:
    cfg = ChannelConfig("127.0.0.1:1", keepalive_ms=5000, max_message_bytes=1 << 20, token="s3cret")
    options = dict(cfg.options())
    assert options["grpc.keepalive_time_ms"] == 5000
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 1 << 20
    assert options["grpc.enable_retries"] == 0  # one retry policy: ours
    # A restarted server is reached within ~2 s, not after gRPC's reconnect backoff of up to 120 s.
    assert (options["grpc.initial_reconnect_backoff_ms"], options["grpc.max_reconnect_backoff_ms"]) == (
        100,
        2000,
    )
    assert cfg.metadata() == (("authorization", "Bearer s3cret"),)
    assert ChannelConfig("127.0.0.1:1").metadata() == ()
    assert not cfg.tls and cfg.credentials() is None


def test_client_certificate_needs_tls_and_a_key() -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        ChannelConfig("127.0.0.1:1", client_cert="c.pem", client_key="k.pem")
