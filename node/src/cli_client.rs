//! `quorumkv put | get | delete`: the client commands of the `quorumkv` binary.
//!
//! A thin shell over [`quorumkv_client`]: parse flags, connect, run one request, print. The
//! output formats and exit codes are defined (and unit-tested) in the client crate, in
//! [`quorumkv_client::render`] and [`quorumkv_client::exit_code`]; in short:
//!
//! - `get` prints each value on its own line on stdout and `context: <token>` on stderr
//!   (plus `encoding: base64` when a value is not UTF-8 and all are shown in base64);
//!   `get --json` prints one line `{"siblings":[...],"context":"...","encoding":"utf8"}`.
//!   `get --output FILE` writes the key's one value, raw, to FILE and prints only the context
//!   (a key with no value or with siblings is refused with exit code 2).
//! - `put` and `delete` print the new context token (`--json`: `{"context":"..."}`); `put`
//!   takes the value from `--value-file FILE` (`-`: standard input) instead of VALUE.
//! - Errors are one line on stderr (`error: ...`, or with `--json`
//!   `{"error":{"kind":"...","message":"...",...}}`), and the exit code says what kind:
//!   2 invalid input, 3 quorum not reached (the write may still have been applied),
//!   4 cluster unreachable or timed out, 5 certificate refused, 6 overloaded, 1 anything else.
//!
//! Semantics worth knowing at the shell:
//!
//! - `put` without `--context` is a blind write: if the key already has a value, the new one
//!   becomes a sibling of it. To replace, pass the context a `get` printed.
//! - `delete` without `--context` first reads the key (with `--r`) and deletes exactly what that
//!   read saw, which is what "delete this key" means at a shell. A value written concurrently
//!   with the delete survives it, as Dynamo-style stores promise.
//! - `--timeout-ms` is sent as the request's coordinator timeout and also bounds the client's
//!   wait for each attempt (plus half a second, for the answer to travel back). Without it the
//!   client waits the cluster's own coordinator timeout plus that margin.
//! - A dead node does not stall a command: the seeds are dialed in a staggered race and the
//!   first to connect is used, and a request whose first replica does not connect goes to the
//!   next one after a short delay (see [`quorumkv_client::client`]). Nothing is remembered
//!   between commands, so each one pays that delay again (tens of milliseconds), never a
//!   timeout. `RUST_LOG=quorumkv_client=debug` shows the client's dials, races and hedges.

use clap::Args;
use quorumkv_client::{
    exit_code, render, Client, ClientBuilder, Context, Error, ReadOptions, ReadRepair,
    WriteOptions, DEFAULT_KEYSPACE,
};
use std::path::PathBuf;

/// How to reach the cluster: flags (and environment variables) shared by every client command,
/// `put`, `get` and `delete` as well as `admin replicas`.
#[derive(Args, Clone, Debug)]
pub struct ConnectArgs {
    /// Seed nodes, comma-separated `host:port` (any node of the cluster will do).
    #[arg(long, env = "QUORUMKV_NODES", value_delimiter = ',', required = true)]
    pub nodes: Vec<String>,
    /// PEM file with the cluster CA certificate.
    #[arg(long, env = "QUORUMKV_CA")]
    pub ca: PathBuf,
    /// PEM file with this client's certificate (issued by the cluster CA).
    #[arg(long, env = "QUORUMKV_CERT")]
    pub cert: PathBuf,
    /// PEM file with this client's private key.
    // The id differs from the field's default so the flag cannot clash with a positional `key`
    // argument of the subcommand that flattens these flags (`quorumkv get KEY --key k.pem`).
    #[arg(
        long = "key",
        id = "tls_key",
        env = "QUORUMKV_KEY",
        value_name = "KEY_PEM"
    )]
    pub tls_key: PathBuf,
}

impl ConnectArgs {
    /// A client connected to the seeds with these certificates.
    pub async fn connect(&self) -> Result<Client, Error> {
        // `--timeout-ms` needs no client setting: each request carries it, and the client's wait
        // for an attempt follows it.
        ClientBuilder::new()
            .seeds(
                self.nodes
                    .iter()
                    .map(|node| node.trim())
                    .filter(|node| !node.is_empty()),
            )
            .identity_files(&self.ca, &self.cert, &self.tls_key)
            .build()
            .await
    }
}

/// Flags shared by `put`, `get` and `delete`.
#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Keyspace of the key.
    #[arg(long, default_value = DEFAULT_KEYSPACE)]
    pub keyspace: String,
    /// Replicas that must answer a read (default: a majority of the keyspace's N).
    #[arg(long)]
    pub r: Option<u8>,
    /// Replicas that must acknowledge a write (default: a majority of N).
    #[arg(long)]
    pub w: Option<u8>,
    /// How many of those acknowledgements must be durable (flushed to disk; default 1).
    #[arg(long)]
    pub dw: Option<u8>,
    /// How many of a read's answers must come from the key's primary owners (default 0).
    #[arg(long)]
    pub pr: Option<u8>,
    /// How many of a write's acknowledgements must come from primary owners rather than
    /// fallbacks holding a hint (default 0).
    #[arg(long)]
    pub pw: Option<u8>,
    /// Count only primary owners toward W: no fallback stands in for an owner that is down.
    #[arg(long)]
    pub no_sloppy_quorum: bool,
    /// Reply to a read only once at least R replicas hold the version it returns (blocking read
    /// repair, for monotonic quorum reads); by default repair runs after the reply.
    #[arg(long)]
    pub blocking_repair: bool,
    /// How long the coordinator waits for replicas, in milliseconds (default: the node's).
    #[arg(long = "timeout-ms")]
    pub timeout_ms: Option<u32>,
    /// Context token from an earlier `get` (base64url): the write replaces what that read saw.
    #[arg(long)]
    pub context: Option<String>,
    /// Print results and errors as one JSON line each.
    #[arg(long)]
    pub json: bool,
}

impl ClientArgs {
    fn read_options(&self) -> ReadOptions {
        ReadOptions {
            r: self.r,
            timeout_ms: self.timeout_ms,
            pr: self.pr,
            repair: if self.blocking_repair {
                ReadRepair::Blocking
            } else {
                ReadRepair::Background
            },
        }
    }

    fn write_options(&self) -> WriteOptions {
        WriteOptions {
            w: self.w,
            dw: self.dw,
            timeout_ms: self.timeout_ms,
            pw: self.pw,
            sloppy_quorum: self.no_sloppy_quorum.then_some(false),
        }
    }

    /// The `--context` token, checked before any connection is made.
    fn parsed_context(&self) -> Result<Option<Context>, Error> {
        self.context
            .as_deref()
            .map(str::parse::<Context>)
            .transpose()
    }

    async fn connect(&self) -> Result<Client, Error> {
        self.connect.connect().await
    }

    /// Reports that the value could not be read from `path` (`--value-file`) and returns the
    /// exit code of an invalid request.
    pub fn fail_reading(&self, path: &std::path::Path, error: &std::io::Error) -> i32 {
        self.fail(&Error::InvalidRequest {
            message: format!("cannot read the value from {}: {error}", path.display()),
        })
    }

    /// Prints `error` in the chosen format and returns its exit code.
    fn fail(&self, error: &Error) -> i32 {
        if self.json {
            eprintln!("{}", render::error_json(error));
        } else {
            eprintln!("{}", render::error_text(error));
        }
        exit_code(error)
    }

    /// Prints a write's context and returns 0.
    fn print_context(&self, context: &Context) -> i32 {
        if self.json {
            println!("{}", render::context_json(context));
        } else {
            println!("{context}");
        }
        0
    }
}

/// `quorumkv put KEY VALUE`: writes `value`'s bytes. Returns the exit code.
pub async fn run_put(args: &ClientArgs, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> i32 {
    let (key, value) = (key.as_ref(), value.as_ref());
    let result = async {
        let context = args.parsed_context()?;
        let client = args.connect().await?;
        let written = client
            .put(
                &args.keyspace,
                key,
                value.to_vec(),
                context.as_ref(),
                args.write_options(),
            )
            .await;
        client.close().await;
        written
    }
    .await;
    match result {
        Ok(context) => args.print_context(&context),
        Err(error) => args.fail(&error),
    }
}

/// `quorumkv get KEY`: prints the siblings and the context. Returns the exit code.
pub async fn run_get(
    args: &ClientArgs,
    key: impl AsRef<[u8]>,
    output: Option<&std::path::Path>,
) -> i32 {
    let key = key.as_ref();
    let result = async {
        let client = args.connect().await?;
        let read = client.get(&args.keyspace, key, args.read_options()).await;
        client.close().await;
        read
    }
    .await;
    match (result, output) {
        (Ok(read), Some(path)) => {
            let [sibling] = read.siblings.as_slice() else {
                return args.fail(&Error::InvalidRequest {
                    message: format!(
                        "--output writes exactly one value, and the key has {}; read it \
                         without --output to see them",
                        read.siblings.len()
                    ),
                });
            };
            if let Err(e) = std::fs::write(path, &sibling.value) {
                return args.fail(&Error::InvalidRequest {
                    message: format!("cannot write the value to {}: {e}", path.display()),
                });
            }
            if args.json {
                println!("{}", render::context_json(&read.context));
            } else {
                eprintln!("context: {}", read.context);
            }
            0
        }
        (Ok(read), None) if args.json => {
            println!("{}", render::get_json(&read));
            0
        }
        (Ok(read), None) => {
            let text = render::get_text(&read);
            print!("{}", text.stdout);
            eprint!("{}", text.stderr);
            0
        }
        (Err(error), _) => args.fail(&error),
    }
}

/// `quorumkv delete KEY`: deletes what `--context` covers, or what a read sees now. Returns the
/// exit code.
pub async fn run_delete(args: &ClientArgs, key: impl AsRef<[u8]>) -> i32 {
    let key = key.as_ref();
    let result = async {
        let context = args.parsed_context()?;
        let client = args.connect().await?;
        let deleted = async {
            let context = match context {
                Some(context) => context,
                None => {
                    client
                        .get(&args.keyspace, key, args.read_options())
                        .await?
                        .context
                }
            };
            client
                .delete(&args.keyspace, key, Some(&context), args.write_options())
                .await
        }
        .await;
        client.close().await;
        deleted
    }
    .await;
    match result {
        Ok(context) => args.print_context(&context),
        Err(error) => args.fail(&error),
    }
}
