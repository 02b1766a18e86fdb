//! End to end, with real `keel server` processes serving TLS (certificates from `keel cert`):
//! a client that trusts the cluster CA works, through the Rust client and the CLI; plaintext,
//! another CA's server trust or another CA's client certificate get nothing; the peer port
//! admits node certificates only, and a node certificate cannot speak for another node.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Real processes run on real time.
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::path::Path;
use std::time::Duration;

use keel_client::{Producer, ProducerConfig, ProducerRecord, TopicConfig};
use keel_proto::v1 as pb;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A TLS channel to `addr` trusting `ca`, presenting `identity` (certificate and key files) if
/// given; `Err` if the connection or its handshake fails.
async fn connect(addr: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    let endpoint = Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap();
    tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("{e:?}"))
}

/// Whether a ListTopics call over `channel` is answered (rather than refused at the door).
async fn answered(channel: Channel) -> Result<(), tonic::Status> {
    let mut admin = pb::admin_client::AdminClient::new(channel);
    admin.list_topics(pb::ListTopicsRequest {}).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_admits_only_who_proves_itself() {
    let cluster = common::Cluster::start_tls(3, 100).await;
    let (tls_dir, _) = cluster.tls.clone().unwrap();
    let ca = tls_dir.join("ca.pem");
    let node = &cluster.nodes[0];

    // Trusting the cluster CA: produce and read back through the Rust client.
    let admin = cluster.admin();
    admin.create_topic("t", 1, 3, TopicConfig::default()).await.unwrap();
    let producer = Producer::new(cluster.client(1), ProducerConfig::default()).unwrap();
    let mut deliveries = Vec::new();
    for i in 0..20u64 {
        let record = ProducerRecord::new(format!("v{i}").into_bytes()).with_partition(0);
        deliveries.push(producer.send("t", record).await.unwrap());
    }
    for delivery in deliveries {
        delivery.await.unwrap();
    }
    producer.close().await;
    let got = common::read_all(cluster.client(2), "t", &[(0, 20)].into()).await;
    assert_eq!(got.len(), 20);

    // The CLI takes the CA from KEEL_CA_FILE; without it, it cannot reach a TLS cluster.
    let cli = |ca: Option<&Path>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .args(["topic", "list", "--output", "json"])
            .env("KEEL_BOOTSTRAP", cluster.bootstrap())
            .env_remove("KEEL_CA_FILE");
        if let Some(ca) = ca {
            command.env("KEEL_CA_FILE", ca);
        }
        command.output().unwrap()
    };
    let listed = cli(Some(&ca));
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("\"t\""), "{}", String::from_utf8_lossy(&listed.stdout));
    assert!(!cli(None).status.success(), "a plaintext CLI reached a TLS cluster");

    // Plaintext gets nothing.
    let plain = Channel::from_shared(format!("http://{}", node.addr)).unwrap();
    let plain = tokio::time::timeout(Duration::from_secs(5), plain.connect()).await.unwrap();
    if let Ok(channel) = plain {
        let refused = answered(channel).await.unwrap_err();
        assert_ne!(refused.code(), Code::Ok);
    }

    // Another CA: its server trust fails the handshake, and so does its client certificate.
    let other = cluster.dir.path().join("other-ca");
    let other_text = other.display().to_string();
    common::keel(&["cert", "ca", "--dir", &other_text]);
    common::keel(&["cert", "client", "mallory", "--dir", &other_text]);
    let refused = connect(&node.addr, &other.join("ca.pem"), None).await;
    assert!(refused.is_err(), "a client trusting another CA connected");
    let mallory = (other.join("client-mallory.pem"), other.join("client-mallory.key"));
    if let Ok(channel) = connect(&node.addr, &ca, Some((&mallory.0, &mallory.1))).await {
        // TLS 1.3 reports a refused client certificate on the first read.
        assert!(answered(channel).await.is_err(), "a certificate from another CA was accepted");
    }
    answered(connect(&node.addr, &ca, None).await.unwrap()).await.unwrap();

    // The client port serves no peer service, over TLS either.
    let channel = connect(&node.addr, &ca, None).await.unwrap();
    let refused = pb::raft_client::RaftClient::new(channel)
        .vote(pb::VoteRequest { group_id: 0, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");

    // The peer port: no certificate, no connection; a user's certificate from the cluster CA
    // is refused; a node's certificate cannot speak for another node.
    if let Ok(channel) = connect(&node.peer_addr, &ca, None).await {
        assert!(answered(channel).await.is_err(), "the peer port served a client without a certificate");
    }
    let tls_text = tls_dir.display().to_string();
    common::keel(&["cert", "client", "bob", "--dir", &tls_text]);
    let bob = (tls_dir.join("client-bob.pem"), tls_dir.join("client-bob.key"));
    let channel = connect(&node.peer_addr, &ca, Some((&bob.0, &bob.1))).await.unwrap();
    let refused = answered(channel).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let before = admin.describe_cluster().await.unwrap();
    let node3 = (tls_dir.join("node-3.pem"), tls_dir.join("node-3.key"));
    let channel = connect(&node.peer_addr, &ca, Some((&node3.0, &node3.1))).await.unwrap();
    let forged = pb::RegisterNodeRequest {
        node_id: 2,
        addr: "127.0.0.1:1".into(),
        cluster_id: before.cluster_id.clone(),
        node_key: vec![0x5a; 32].into(),
        peer_addr: "127.0.0.1:2".into(),
    };
    let refused =
        pb::controller_client::ControllerClient::new(channel.clone()).register_node(forged).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let vote = pb::VoteRequest {
        group_id: 0,
        vote: Some(pb::Vote { term: 1_000_000, node_id: 2, committed: false }),
        ..Default::default()
    };
    let refused = pb::raft_client::RaftClient::new(channel).vote(vote).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let addresses = |d: &pb::DescribeClusterResponse| {
        let mut nodes: Vec<(u64, String)> = d.nodes.iter().map(|n| (n.node_id, n.addr.clone())).collect();
        nodes.sort();
        nodes
    };
    assert_eq!(addresses(&admin.describe_cluster().await.unwrap()), addresses(&before));
}

/// With a tokens file: no token or an unknown one is UNAUTHENTICATED; a principal without an
/// ACL is PERMISSION_DENIED and writes nothing; `keel acl add` (by the superuser) lets it
/// produce, and nothing more; the rules live in `__meta` and survive a node's restart; a token
/// removed from the file stops working without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_acls_decide_who_does_what() {
    let mut cluster = common::Cluster::start_auth(3, 104, &["alice"]).await;
    let (tls_dir, _) = cluster.tls.clone().unwrap();
    let admin = cluster.admin();
    admin.create_topic("orders", 1, 3, TopicConfig::default()).await.unwrap();
    admin.create_topic("secret", 1, 3, TopicConfig::default()).await.unwrap();
    common::wait_leaders(&admin, "orders").await;
    let (node1, bootstrap) = (cluster.nodes[0].addr.clone(), cluster.bootstrap());
    let admin_token = cluster.tokens["admin"].clone();
    let produce_raw = |token: Option<&str>| {
        let node = node1.clone();
        let ca = tls_dir.join("ca.pem");
        let token = token.map(str::to_owned);
        async move {
            let channel = connect(&node, &ca, None).await.unwrap();
            let mut request = tonic::Request::new(pb::ProduceRequest {
                topic: "orders".into(),
                partition: 0,
                records: vec![pb::Record { value: Some(b"x".to_vec().into()), ..Default::default() }],
                ..Default::default()
            });
            if let Some(token) = token {
                request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            pb::producer_client::ProducerClient::new(channel).produce(request).await
        }
    };
    assert_eq!(produce_raw(None).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(produce_raw(Some("not-a-token")).await.unwrap_err().code(), Code::Unauthenticated);
    let alice_token = cluster.tokens["alice"].clone();
    assert_eq!(produce_raw(Some(&alice_token)).await.unwrap_err().code(), Code::PermissionDenied);
    let hw = |d: &pb::TopicDescription| d.partitions[0].high_watermark;
    assert_eq!(hw(&admin.describe_topic("orders").await.unwrap()), 0, "a denied produce wrote nothing");

    // The superuser allows alice to produce to orders, through the CLI.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(args)
            .env("KEEL_BOOTSTRAP", &bootstrap)
            .env("KEEL_CA_FILE", tls_dir.join("ca.pem"))
            .env("KEEL_TOKEN", &admin_token)
            .output()
            .unwrap();
        assert!(out.status.success(), "keel {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["acl", "add", "--principal", "User:alice", "--topic", "orders", "--operation", "produce"]);
    let listed = cli(&["acl", "list", "--output", "json"]);
    assert!(listed.contains("User:alice") && listed.contains("orders"), "{listed}");
    produce_raw(Some(&alice_token)).await.unwrap();
    assert_eq!(hw(&admin.describe_topic("orders").await.unwrap()), 1);

    // Nothing more: no consume, no other topic, no admin; she sees only her topic.
    let alice = keel_client::Admin::new(cluster.client_as("alice", 3)).unwrap();
    let topics: Vec<String> = alice.list_topics().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(topics, ["orders"]);
    assert!(alice.delete_topic("secret").await.is_err());
    let rule = pb::AclRule {
        principal: "User:alice".into(),
        resource_type: "cluster".into(),
        operation: "admin".into(),
        ..Default::default()
    };
    assert!(alice.add_acl(rule).await.is_err(), "alice made herself admin");
    let channel = connect(&cluster.nodes[0].addr, &tls_dir.join("ca.pem"), None).await.unwrap();
    let mut fetch = tonic::Request::new(pb::FetchRequest { topic: "orders".into(), ..Default::default() });
    fetch.metadata_mut().insert("authorization", format!("Bearer {alice_token}").parse().unwrap());
    let refused = pb::consumer_client::ConsumerClient::new(channel).fetch(fetch).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "alice read: {refused:?}");

    // The rule is in __meta: a restarted node has it.
    cluster.kill(1);
    cluster.restart(1);
    cluster.wait_healthy(Duration::from_secs(60)).await;
    assert!(cli(&["acl", "list", "--principal", "User:alice", "--output", "json"]).contains("orders"));

    // Revoking a token is removing its line: no restart.
    let tokens_file = tls_dir.join("tokens");
    let kept: String = std::fs::read_to_string(&tokens_file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("alice "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&tokens_file, kept).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match produce_raw(Some(&alice_token)).await {
            Err(status) if status.code() == Code::Unauthenticated => break,
            _ => assert!(std::time::Instant::now() < deadline, "a removed token still works"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A produce quota: a principal over its byte rate gets RESOURCE_EXHAUSTED with a RetryInfo
/// (and nothing is written), is served again once it waited that long, and the Rust producer,
/// which honours the delay, gets every record acknowledged through the throttling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_over_its_quota_is_told_when_to_come_back() {
    use tonic_types::StatusExt;
    // 100 KB/s, and requests of 200 KB: the second in a row overdraws (a request would have to
    // take more than a second to stay under it).
    let cluster = common::Cluster::start_auth_with(1, 108, &["alice"], "quota_produce_bytes_per_sec = 100000\n").await;
    let (tls_dir, _) = cluster.tls.clone().unwrap();
    let admin = cluster.admin();
    admin.create_topic("q", 1, 1, TopicConfig::default()).await.unwrap();
    common::wait_leaders(&admin, "q").await;
    let alice = cluster.tokens["alice"].clone();
    let rule = pb::AclRule {
        principal: "User:alice".into(),
        resource_type: "topic".into(),
        name: "q".into(),
        operation: "produce".into(),
        ..Default::default()
    };
    admin.add_acl(rule).await.unwrap();
    let channel = connect(&cluster.nodes[0].addr, &tls_dir.join("ca.pem"), None).await.unwrap();
    let produce = |channel: Channel| {
        let alice = alice.clone();
        async move {
            let mut request = tonic::Request::new(pb::ProduceRequest {
                topic: "q".into(),
                partition: 0,
                records: vec![pb::Record { value: Some(vec![7u8; 200_000].into()), ..Default::default() }],
                ..Default::default()
            });
            request.metadata_mut().insert("authorization", format!("Bearer {alice}").parse().unwrap());
            pb::producer_client::ProducerClient::new(channel).produce(request).await
        }
    };
    produce(channel.clone()).await.unwrap();
    let refused = produce(channel.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let wait = refused.get_details_retry_info().and_then(|r| r.retry_delay).expect("a RetryInfo");
    assert!(wait > Duration::ZERO && wait <= Duration::from_secs(2), "{wait:?}");
    let written = |d: &pb::TopicDescription| d.partitions[0].high_watermark;
    assert_eq!(written(&admin.describe_topic("q").await.unwrap()), 1, "the refused produce wrote nothing");
    tokio::time::sleep(wait).await;
    produce(channel).await.unwrap();

    // The Rust producer waits as told and gets everything acknowledged (one record per request:
    // each waits for the one before, so most of them meet the quota).
    let producer = Producer::new(cluster.client_as("alice", 5), ProducerConfig::default()).unwrap();
    for _ in 0..6 {
        let record = ProducerRecord::new(vec![1u8; 100_000]).with_partition(0);
        producer.send("q", record).await.unwrap().await.unwrap();
    }
    producer.close().await;
    assert_eq!(written(&admin.describe_topic("q").await.unwrap()), 8);
}
