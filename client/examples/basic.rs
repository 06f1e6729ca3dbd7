//! A first QuorumKV program: write a key, read it back, and resolve siblings.
//!
//! Run it against a cluster:
//!
//! ```text
//! QUORUMKV_NODES=10.0.0.1:7000,10.0.0.2:7000 \
//! QUORUMKV_CA=ca.pem QUORUMKV_CERT=client.pem QUORUMKV_KEY=client.key \
//!     cargo run -p quorumkv-client --example basic
//! ```

use quorumkv_client::{ClientBuilder, ReadOptions, WriteOptions, DEFAULT_KEYSPACE};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("set {name}"))
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = env("QUORUMKV_NODES")?;
    let client = ClientBuilder::new()
        .seeds(nodes.split(',').map(str::trim).filter(|s| !s.is_empty()))
        .identity_files(
            env("QUORUMKV_CA")?,
            env("QUORUMKV_CERT")?,
            env("QUORUMKV_KEY")?,
        )
        .build()
        .await?;

    // A blind write: no context, so if the key already had values this one becomes a sibling.
    let key = b"example:greeting";
    client
        .put(
            DEFAULT_KEYSPACE,
            key,
            b"hello".to_vec(),
            None,
            WriteOptions::default(),
        )
        .await?;

    // Read with R = 2: at least two replicas answer, so this sees the write above.
    let read_options = ReadOptions {
        r: Some(2),
        timeout_ms: None,
        ..ReadOptions::default()
    };
    let read = client.get(DEFAULT_KEYSPACE, key, read_options).await?;
    for sibling in &read.siblings {
        println!(
            "value: {} (written at {} ms)",
            String::from_utf8_lossy(&sibling.value),
            sibling.timestamp_ms
        );
    }

    // An update that reads first and passes the context replaces exactly what it read.
    client
        .put(
            DEFAULT_KEYSPACE,
            key,
            b"hello, world".to_vec(),
            Some(&read.context),
            WriteOptions::default(),
        )
        .await?;

    // When concurrent writers left siblings, merge them; here the newest timestamp wins.
    let context = client
        .resolve(
            DEFAULT_KEYSPACE,
            key,
            read_options,
            WriteOptions::default(),
            |siblings| {
                siblings
                    .iter()
                    .max_by_key(|sibling| sibling.timestamp_ms)
                    .map(|sibling| sibling.value.clone())
                    .unwrap_or_default()
            },
        )
        .await?;
    println!("context after resolving: {context}");

    client.close().await;
    Ok(())
}
