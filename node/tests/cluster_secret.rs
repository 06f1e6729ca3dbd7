//! A node refuses to start without its cluster secret, and says which file is missing: without
//! it, the node would hand out contexts that no other node accepts.

use quorumkv_node::dev::{self, Ports};

#[tokio::test]
async fn a_node_without_its_cluster_secret_refuses_to_start() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cluster = dev::prepare(
        dir.path(),
        1,
        &Ports::Base {
            quic: 47_401,
            admin: 49_401,
        },
        64,
    )
    .expect("a dev layout");
    let config = cluster.nodes[0].config.clone();
    assert!(config.tls.cluster_secret.exists(), "dev writes the secret");
    std::fs::remove_file(&config.tls.cluster_secret).expect("removing the secret");
    let err = quorumkv_node::server::run(config, None, std::future::pending())
        .await
        .expect_err("a node without its secret must not start");
    let message = err.to_string();
    assert!(
        message.contains("cluster.secret") && message.contains("cluster secret"),
        "{message}"
    );
}
