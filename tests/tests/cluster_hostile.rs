//! Hostile and mistaken input against real processes: broken frames on a raw QUIC connection,
//! oversized keys and values, forged contexts, foreign and missing certificates, a client
//! certificate on the peer protocol, and a node configured with another member list. After
//! each, the cluster keeps serving.

use quorumkv_client::frame::encode_frame;
use quorumkv_client::protocol::{
    ErrorKind, ReadOptions, Request, Response, WriteOptions, CLIENT_ALPN,
};
use quorumkv_client::{Client, Context, Error, DEFAULT_KEYSPACE};
use quorumkv_node::certs::{self, IfExists};
use quorumkv_node::config::MemberConfig;
use quorumkv_node::tls::PEER_ALPN;
use quorumkv_ring::NodeId;
use quorumkv_tests::cluster::{
    free_port_pairs, wait_until, within, ClusterOptions, RawConnection, RawIdentity, RawOutcome,
    TestCluster,
};
use std::net::SocketAddr;
use std::time::Duration;

const TEST_LIMIT: Duration = Duration::from_secs(120);
const BAD_FRAMES: &str = "quorumkv_bad_frames_total";
const LIMIT_EXCEEDED: &str = "quorumkv_limit_exceeded_total";
const PEER_REFUSED: &str = "quorumkv_peer_refused_total";

/// A normal write and read through `client` succeed: the cluster still serves.
async fn still_serves(client: &Client, after: &str) {
    let key = format!("still-serving-after-{after}");
    client
        .put(
            DEFAULT_KEYSPACE,
            &key,
            b"yes".to_vec(),
            None,
            WriteOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("put after {after}: {e}"));
    let read = client
        .get(DEFAULT_KEYSPACE, &key, ReadOptions::default())
        .await
        .unwrap_or_else(|e| panic!("get after {after}: {e}"));
    assert_eq!(read.siblings.len(), 1, "after {after}: {read:?}");
}

/// A frame with a valid header and `body`.
fn frame_with_body(body: &[u8]) -> Vec<u8> {
    let mut frame = vec![quorumkv_client::frame::PROTOCOL_VERSION];
    frame.extend_from_slice(
        &u32::try_from(body.len())
            .expect("a small body")
            .to_be_bytes(),
    );
    frame.extend_from_slice(body);
    frame
}

fn get_request(key: &str) -> Request {
    Request::Get {
        keyspace: DEFAULT_KEYSPACE.into(),
        key: key.as_bytes().to_vec(),
        options: ReadOptions::default(),
    }
}

/// Asserts an `InvalidRequest` answer whose message contains `needle`.
fn assert_invalid(outcome: &RawOutcome, needle: &str, what: &str) {
    match outcome {
        RawOutcome::Response(Response::Error(reply))
            if reply.kind == ErrorKind::InvalidRequest && reply.message.contains(needle) => {}
        other => panic!("{what}: expected InvalidRequest mentioning {needle:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_frames_get_an_error_and_the_connection_keeps_serving() {
    let cluster = TestCluster::start(3, ClusterOptions::default());
    within(TEST_LIMIT, async {
        let node = 0;
        let bad_before = cluster.metric(node, BAD_FRAMES, &[("protocol", "client")]);
        let raw = RawConnection::connect(
            cluster.node(node).quic(),
            &cluster.client_identity(),
            CLIENT_ALPN,
            "node.quorumkv",
        )
        .await
        .expect("a raw client connection");

        // (a) A valid header, then bytes that are no request.
        let garbage = frame_with_body(b"\xc1\xc1\xc1 this is not MessagePack");
        assert_invalid(&raw.exchange(&garbage).await, "malformed", "garbage body");

        // (b) A header announcing 100 MiB: refused from the header alone, never allocated.
        let mut huge = vec![quorumkv_client::frame::PROTOCOL_VERSION];
        huge.extend_from_slice(&(100u32 << 20).to_be_bytes());
        huge.extend_from_slice(&[0u8; 4096]);
        match raw.exchange(&huge).await {
            RawOutcome::Response(Response::Error(reply)) => {
                assert_eq!(reply.kind, ErrorKind::InvalidRequest, "{reply:?}");
                assert!(reply.message.contains("exceeds"), "{reply:?}");
            }
            RawOutcome::StreamRefused(_) => {}
            other => panic!("100 MiB header: expected an error or a refused stream, got {other:?}"),
        }

        // (c) An unknown protocol version.
        let mut future = encode_frame(&get_request("k"), 1 << 20).expect("encoding");
        future[0] = 9;
        assert_invalid(&raw.exchange(&future).await, "version", "unknown version");

        // (d) A body shorter than its header says: no answer is owed, but nothing breaks.
        let mut short = frame_with_body(&[0u8; 100]);
        short.truncate(20);
        match raw.exchange(&short).await {
            RawOutcome::ConnectionLost(e) => panic!("a truncated frame cost the connection: {e}"),
            RawOutcome::Response(Response::Error(_))
            | RawOutcome::Garbage(_)
            | RawOutcome::StreamRefused(_) => {}
            other => panic!("a truncated frame got a real answer: {other:?}"),
        }

        // The same connection still serves a well-formed request.
        match raw.request(&get_request("after-bad-frames")).await {
            Response::Got { siblings, .. } => assert!(siblings.is_empty()),
            other => panic!("a good request after bad frames: {other:?}"),
        }
        raw.close().await;

        let bad_after = cluster.metric(node, BAD_FRAMES, &[("protocol", "client")]);
        assert!(
            bad_after >= bad_before + 3.0,
            "{BAD_FRAMES} went from {bad_before} to {bad_after}"
        );
        let client = cluster.client().await;
        still_serves(&client, "bad frames").await;
        client.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_input_and_forged_contexts_are_invalid_requests() {
    let cluster = TestCluster::start(3, ClusterOptions::default());
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        let key_limit_before = cluster.metric_total(LIMIT_EXCEEDED, &[("limit", "key_bytes")]);
        let value_limit_before = cluster.metric_total(LIMIT_EXCEEDED, &[("limit", "value_bytes")]);

        let long_key = vec![b'k'; 1025];
        match client
            .put(
                DEFAULT_KEYSPACE,
                &long_key,
                b"v".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
        {
            Err(Error::InvalidRequest { message }) if message.contains("key_bytes_max") => {}
            other => panic!("a 1025-byte key: {other:?}"),
        }
        match client
            .get(DEFAULT_KEYSPACE, &long_key, ReadOptions::default())
            .await
        {
            Err(Error::InvalidRequest { message }) if message.contains("key_bytes_max") => {}
            other => panic!("reading a 1025-byte key: {other:?}"),
        }
        still_serves(&client, "an oversized key").await;

        let big_value = vec![b'v'; (1 << 20) + 1];
        match client
            .put(
                DEFAULT_KEYSPACE,
                "big",
                big_value,
                None,
                WriteOptions::default(),
            )
            .await
        {
            Err(Error::InvalidRequest { message }) if message.contains("value_bytes_max") => {}
            other => panic!("a value of 1 MiB + 1 byte: {other:?}"),
        }
        still_serves(&client, "an oversized value").await;
        // The largest allowed value is fine.
        let max_value = vec![b'v'; 1 << 20];
        client
            .put(
                DEFAULT_KEYSPACE,
                "biggest",
                max_value,
                None,
                WriteOptions::default(),
            )
            .await
            .expect("a value of exactly value_bytes_max");

        let key_limit = cluster.metric_total(LIMIT_EXCEEDED, &[("limit", "key_bytes")]);
        let value_limit = cluster.metric_total(LIMIT_EXCEEDED, &[("limit", "value_bytes")]);
        assert!(
            key_limit >= key_limit_before + 2.0,
            "key_bytes limit metric: {key_limit_before} -> {key_limit}"
        );
        assert!(
            value_limit > value_limit_before,
            "value_bytes limit metric: {value_limit_before} -> {value_limit}"
        );

        // A context that is no token at all.
        let garbage = Context::from_bytes(b"not a context token".to_vec());
        match client
            .put(
                DEFAULT_KEYSPACE,
                "ctx",
                b"v".to_vec(),
                Some(&garbage),
                WriteOptions::default(),
            )
            .await
        {
            Err(Error::InvalidRequest { message }) if message.contains("context") => {}
            other => panic!("a garbage context: {other:?}"),
        }
        still_serves(&client, "a garbage context").await;

        // A valid context, but issued for another key.
        client
            .put(
                DEFAULT_KEYSPACE,
                "ctx-a",
                b"a".to_vec(),
                None,
                WriteOptions::default(),
            )
            .await
            .expect("put ctx-a");
        let other_key = client
            .get(DEFAULT_KEYSPACE, "ctx-a", ReadOptions::default())
            .await
            .expect("get ctx-a")
            .context;
        match client
            .put(
                DEFAULT_KEYSPACE,
                "ctx-b",
                b"b".to_vec(),
                Some(&other_key),
                WriteOptions::default(),
            )
            .await
        {
            Err(Error::InvalidRequest { message }) if message.contains("different key") => {}
            other => panic!("a context from another key: {other:?}"),
        }
        match client
            .delete(
                DEFAULT_KEYSPACE,
                "ctx-b",
                Some(&other_key),
                WriteOptions::default(),
            )
            .await
        {
            Err(Error::InvalidRequest { message }) if message.contains("different key") => {}
            other => panic!("a delete with a context from another key: {other:?}"),
        }
        // Nothing was written under ctx-b.
        let read = client
            .get(
                DEFAULT_KEYSPACE,
                "ctx-b",
                ReadOptions {
                    r: Some(3),
                    timeout_ms: None,
                    ..ReadOptions::default()
                },
            )
            .await
            .expect("get ctx-b");
        assert!(
            read.siblings.is_empty(),
            "a refused write left data: {read:?}"
        );
        still_serves(&client, "a context from another key").await;
        client.close().await;
    })
    .await;
}

/// The connection error a raw connection ends with: at the handshake or right after it.
async fn refusal(connect: Result<RawConnection, quinn::ConnectionError>) -> quinn::ConnectionError {
    match connect {
        Err(e) => e,
        Ok(raw) => {
            // TLS 1.3 lets the client finish its handshake before the server has judged the
            // client's certificate; the verdict arrives as the connection's close.
            let outcome = raw
                .exchange(&encode_frame(&get_request("k"), 1 << 20).expect("encoding"))
                .await;
            match outcome {
                RawOutcome::ConnectionLost(e) => e,
                other => panic!("expected the connection to be refused, got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_without_the_right_certificate_are_refused() {
    let cluster = TestCluster::start(3, ClusterOptions::default());
    let address: SocketAddr = cluster.node(0).quic();
    let foreign = cluster.dir().join("foreign-ca");
    certs::init_ca(&foreign, IfExists::Refuse).expect("a foreign CA");
    let intruder = certs::issue_client(&foreign, "intruder", IfExists::Refuse)
        .expect("a foreign client certificate");
    within(TEST_LIMIT, async {
        let client = cluster.client().await;

        // No client certificate: the TLS handshake fails.
        let no_cert = RawIdentity::NoCertificate {
            ca: cluster.local().ca.clone(),
        };
        let error =
            refusal(RawConnection::connect(address, &no_cert, CLIENT_ALPN, "node.quorumkv").await)
                .await;
        assert!(
            matches!(
                error,
                quinn::ConnectionError::ConnectionClosed(_)
                    | quinn::ConnectionError::TransportError(_)
            ),
            "no certificate: {error:?}"
        );
        still_serves(&client, "a client without a certificate").await;

        // A certificate from another CA: the client library reports AuthenticationRefused.
        let refused = Client::builder()
            .seeds(cluster.addresses())
            .identity_files(&cluster.local().ca, &intruder.cert, &intruder.key)
            .build()
            .await;
        match refused {
            Err(Error::AuthenticationRefused { reason }) => {
                assert!(!reason.is_empty());
            }
            other => panic!("a foreign certificate: expected AuthenticationRefused, got {other:?}"),
        }
        still_serves(&client, "a foreign certificate").await;

        // The dev *client* certificate on the *peer* protocol: the node closes the connection
        // and says why.
        let refused_before = cluster.metric(0, PEER_REFUSED, &[("reason", "not_a_node")]);
        let connect = RawConnection::connect(
            address,
            &cluster.client_identity(),
            PEER_ALPN,
            "n1.node.quorumkv",
        )
        .await;
        let error = match connect {
            Err(e) => e,
            Ok(raw) => tokio::time::timeout(Duration::from_secs(10), raw.connection.closed())
                .await
                .expect("the node closes a client on the peer protocol"),
        };
        match &error {
            quinn::ConnectionError::ApplicationClosed(close) => {
                let reason = String::from_utf8_lossy(&close.reason);
                assert!(reason.contains("peer protocol"), "close reason: {reason}");
            }
            other => panic!("a client certificate on the peer protocol: {other:?}"),
        }
        let refused_after = cluster.metric(0, PEER_REFUSED, &[("reason", "not_a_node")]);
        assert!(
            refused_after > refused_before,
            "{PEER_REFUSED}{{reason=not_a_node}}: {refused_before} -> {refused_after}"
        );
        still_serves(&client, "a client certificate on the peer protocol").await;
        client.close().await;
    })
    .await;
}

/// A member restarted with a member list that differs from the others' (it adds a node n4):
/// its peers refuse it at the hello, it refuses them, and every log names both cluster-map
/// fingerprints. (A node that is not in the others' map at all is refused earlier, for not
/// being a member: `a_node_certificate_for_a_non_member_is_refused`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_member_with_another_member_list_is_refused() {
    let mut cluster = TestCluster::start(3, ClusterOptions::default());
    let (quic_port, _) = free_port_pairs(1)[0];
    let mut config = cluster.node(2).config.clone();
    config.members.push(MemberConfig {
        id: NodeId::new("n4").expect("a node id"),
        address: SocketAddr::from(([127, 0, 0, 1], quic_port)).to_string(),
        zone: config.zone.clone(),
        capacity: 1,
    });
    config
        .validate()
        .expect("the changed config is valid on its own");
    let ours = cluster.cluster_map().fingerprint();
    let theirs = quorumkv_node::server::cluster_map(&config)
        .expect("their map")
        .fingerprint();
    assert_ne!(ours, theirs);
    cluster.stop(2);
    std::fs::write(
        &cluster.node(2).config_path,
        config.to_toml().expect("TOML"),
    )
    .expect("rewriting n3's config");
    cluster.restart_process(2);
    within(TEST_LIMIT, async {
        let names_both = |text: &str| {
            text.lines().any(|line| {
                line.contains("cluster map mismatch")
                    && line.contains(&ours)
                    && line.contains(&theirs)
            })
        };
        wait_until(
            "every node logs a refusal with both fingerprints",
            Duration::from_secs(30),
            || (0..3).all(|index| names_both(&cluster.log(index))),
        );
        let refused = cluster.metric_total(PEER_REFUSED, &[("reason", "fingerprint_mismatch")]);
        assert!(
            refused >= 2.0,
            "{PEER_REFUSED}{{reason=fingerprint_mismatch}} = {refused}"
        );
    })
    .await;
}

/// A new user's mistake, from the hardening issue: blind puts of 125 KB values to one key.
/// Each adds a sibling until the key's state would no longer fit one replication frame; that
/// write must be refused with an error naming the limit (not blamed on the replicas), and the
/// key must stay readable, with every replica still counted up.
#[tokio::test(flavor = "multi_thread")]
async fn blind_writes_that_would_outgrow_a_frame_are_refused_and_the_key_stays_readable() {
    let cluster = TestCluster::start(3, ClusterOptions::default());
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        let value = vec![b'v'; 125_000];
        let mut written = 0;
        let mut refused = 0;
        for _ in 0..10 {
            match client
                .put(
                    DEFAULT_KEYSPACE,
                    "crowded",
                    value.clone(),
                    None,
                    WriteOptions::default(),
                )
                .await
            {
                Ok(_) => written += 1,
                Err(Error::InvalidRequest { message }) if message.contains("frame_bytes_max") => {
                    refused += 1
                }
                Err(other) => panic!("after {written} writes: {other}"),
            }
        }
        assert!(
            written >= 5 && refused >= 1,
            "{written} written, {refused} refused"
        );
        let read = client
            .get(
                DEFAULT_KEYSPACE,
                "crowded",
                ReadOptions {
                    r: Some(3),
                    timeout_ms: None,
                    ..ReadOptions::default()
                },
            )
            .await
            .expect("the crowded key stays readable from every replica");
        assert_eq!(read.siblings.len(), written);
        // A write with the read's context resolves it.
        client
            .put(
                DEFAULT_KEYSPACE,
                "crowded",
                b"resolved".to_vec(),
                Some(&read.context),
                WriteOptions::default(),
            )
            .await
            .expect("a resolving write is accepted");
        still_serves(&client, "a crowded key").await;
    })
    .await;
}

/// A node certificate properly issued by the cluster's own CA, but for an id that is not in the
/// cluster map, on the peer protocol: the node closes the connection at once with a reason, a
/// metric and a log line, and the replica write the outsider sends (after a hello with the
/// right fingerprint, as a member would) is never applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_certificate_for_a_non_member_is_refused() {
    use quorumkv_node::peer::{Hello, OpId, PeerMessage};
    use quorumkv_node::version_vector::{Actor, CausalContext, Dot, KeyState, RequestId};

    let cluster = TestCluster::start(3, ClusterOptions::default());
    let outsider_id = NodeId::new("n4").expect("a node id");
    let certs_dir = cluster.dir().join("certs");
    let outsider = certs::issue_node(&certs_dir, &outsider_id, IfExists::Refuse)
        .expect("a certificate for n4 from the cluster CA");
    let identity = RawIdentity::Certificate {
        ca: cluster.local().ca.clone(),
        cert: outsider.cert.clone(),
        key: outsider.key.clone(),
    };
    let mut state = KeyState::new();
    state
        .update(
            &CausalContext::new(),
            Dot::new(Actor(0xbad), 1),
            RequestId([4; 16]),
            0,
            Some(b"planted by n4".to_vec()),
        )
        .expect("a fresh dot");
    let hello = Hello {
        node: outsider_id.to_string(),
        fingerprint: cluster.cluster_map().fingerprint(),
        instance: 4,
    };
    let replicate = PeerMessage::Replicate {
        op: OpId(4, 1),
        keyspace: DEFAULT_KEYSPACE.into(),
        key: b"planted".to_vec(),
        state: state.encode_canonical(),
        durable: false,
        hint_for: None,
    };
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        let before = cluster.metric(0, PEER_REFUSED, &[("reason", "not_a_member")]);
        let connect = RawConnection::connect(
            cluster.node(0).quic(),
            &identity,
            PEER_ALPN,
            "n1.node.quorumkv",
        )
        .await;
        let error = match connect {
            Err(e) => e,
            Ok(raw) => {
                // Speak the peer protocol as a member would; the node may have closed the
                // connection already, so failures to send are expected.
                if let Ok(mut send) = raw.connection.open_uni().await {
                    for frame in [
                        encode_frame(&hello, 1 << 20).expect("a hello"),
                        encode_frame(&replicate, 1 << 20).expect("a replica write"),
                    ] {
                        let _ = send.write_all(&frame).await;
                    }
                }
                tokio::time::timeout(Duration::from_secs(10), raw.connection.closed())
                    .await
                    .expect("the node closes a non-member's connection")
            }
        };
        match &error {
            quinn::ConnectionError::ApplicationClosed(close) => {
                let reason = String::from_utf8_lossy(&close.reason);
                assert!(reason.contains("not a member"), "close reason: {reason}");
            }
            other => panic!("a non-member on the peer protocol: {other:?}"),
        }
        let after = cluster.metric(0, PEER_REFUSED, &[("reason", "not_a_member")]);
        assert!(
            after > before,
            "{PEER_REFUSED}{{reason=not_a_member}}: {before} -> {after}"
        );
        assert!(
            cluster
                .log(0)
                .lines()
                .any(|line| line.contains("node n4 is not a member")),
            "no log line names the refused node:\n{}",
            cluster.log_tails()
        );
        let read = client
            .get(
                DEFAULT_KEYSPACE,
                "planted",
                ReadOptions {
                    r: Some(3),
                    ..ReadOptions::default()
                },
            )
            .await
            .expect("reading the planted key");
        assert!(read.siblings.is_empty(), "a non-member wrote: {read:?}");
        still_serves(&client, "a non-member on the peer protocol").await;
        client.close().await;
    })
    .await;
}

/// A client that announces a 1 MiB request, sends ten bytes of it and stalls: the node cuts the
/// stream off at the frame read deadline (here 500 ms), counts it, logs it, and keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_request_frame_is_cut_off_at_its_deadline() {
    const FRAME_TIMEOUTS: &str = "quorumkv_frame_read_timeouts_total";
    let options = ClusterOptions {
        patch: Some(|_, config| config.timeouts.frame_read_timeout_ms = 500),
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(3, options);
    within(TEST_LIMIT, async {
        let client = cluster.client().await;
        let before = cluster.metric(0, FRAME_TIMEOUTS, &[("protocol", "client")]);
        let raw = RawConnection::connect(
            cluster.node(0).quic(),
            &cluster.client_identity(),
            CLIENT_ALPN,
            "node.quorumkv",
        )
        .await
        .expect("a client connection");
        let (mut send, mut recv) = raw.connection.open_bi().await.expect("a stream");
        let mut stalled = vec![quorumkv_client::frame::PROTOCOL_VERSION];
        stalled.extend_from_slice(&(1u32 << 20).to_be_bytes());
        stalled.extend_from_slice(&[0x90; 10]);
        send.write_all(&stalled)
            .await
            .expect("sending the start of a frame");
        // The stream stays open and silent; the node must end it, not wait.
        let answer = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(1 << 20))
            .await
            .expect("the node ends a stalled stream");
        assert!(
            answer.is_err(),
            "a stalled request got an answer: {answer:?}"
        );
        wait_until("the stall is counted", Duration::from_secs(10), || {
            cluster.metric(0, FRAME_TIMEOUTS, &[("protocol", "client")]) > before
        });
        assert!(
            cluster
                .log(0)
                .lines()
                .any(|line| line.contains("frame stalled")),
            "no log line for the stall:\n{}",
            cluster.log_tails()
        );
        still_serves(&client, "a stalled request frame").await;
        raw.close().await;
        client.close().await;
    })
    .await;
}
