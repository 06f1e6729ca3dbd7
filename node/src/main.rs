//! `quorumkv`: the QuorumKV node binary and its operator commands.
//!
//! Subcommands (one variant of [`Command`] each):
//!
//! - `quorumkv certs init --dir DIR [--force]`: create the cluster CA (`ca.pem`, `ca.key`) and
//!   the cluster secret (`cluster.secret`) if there is none.
//! - `quorumkv certs issue --dir DIR (--node ID | --client NAME) [--force]`: issue a node or
//!   client certificate signed by the CA in DIR.
//! - `quorumkv certs secret (--dir DIR | --out FILE) [--force]`: write a new cluster secret
//!   (for a CA made before secrets existed, or a rotation).
//! - `quorumkv config check [--config FILE] [flags]`: load and validate a configuration, check
//!   its TLS files and cluster secrets, and print the effective configuration as TOML.
//! - `quorumkv start [--config FILE] [flags]`: run a node until SIGINT or SIGTERM, then stop
//!   it cleanly (flush, write the clean-shutdown incarnation record).
//! - `quorumkv dev [--nodes 3] [--dir DIR]`: run a local cluster on loopback.
//! - `quorumkv put KEY VALUE`, `get KEY`, `delete KEY`: talk to a cluster (see
//!   `quorumkv_node::cli_client` for flags, output formats and exit codes).
//! - `quorumkv admin replicas KEY`, `admin sync-status --admin ADDR,...`: inspect a cluster
//!   without changing it (see `quorumkv_node::cli_admin`).
//!
//! Exit status: 0 on success; 2 for usage errors and invalid input (bad flags, a bad or
//! missing config, an invalid name, certificate files that are missing or do not fit the
//! config, a file that exists without `--force`); 1 for everything else. Errors are one line
//! on stderr. Logs go to stderr too, filtered by `RUST_LOG` (default `info`; `warn` for the
//! client commands, whose stderr is part of their output).

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use quorumkv_node::certs::{self, IfExists};
use quorumkv_node::cli_admin::{run_admin, AdminCommand};
use quorumkv_node::cli_client::{run_delete, run_get, run_put, ClientArgs};
use quorumkv_node::config::ConfigArgs;
use quorumkv_node::dev::DevArgs;
use quorumkv_node::{tls, Error};
use quorumkv_ring::NodeId;
use std::path::PathBuf;
use std::process::ExitCode;

/// QuorumKV: a leaderless, Dynamo-style replicated key-value store.
#[derive(Debug, Parser)]
#[command(name = "quorumkv", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the cluster CA and issue node and client certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Inspect a node configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run a node.
    Start {
        // Boxed: the overrides are large next to every other subcommand's arguments.
        #[command(flatten)]
        config: Box<ConfigArgs>,
    },
    /// Run a local cluster on loopback: certificates, configs and data under DIR.
    Dev(DevArgs),
    /// Write VALUE under KEY (or the bytes of `--value-file`).
    Put {
        key: String,
        #[arg(required_unless_present = "value_file")]
        value: Option<String>,
        /// Write the bytes of FILE instead of VALUE (`-`: standard input), for values that
        /// are not text or do not fit on a command line.
        #[arg(long, value_name = "FILE", conflicts_with = "value")]
        value_file: Option<PathBuf>,
        #[command(flatten)]
        args: Box<ClientArgs>,
    },
    /// Read KEY: its siblings and a context for the next write.
    Get {
        key: String,
        /// Write the value's raw bytes to FILE instead of printing it (the key must have
        /// exactly one value); the context is printed as usual.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        args: Box<ClientArgs>,
    },
    /// Delete KEY (what the given context, or a fresh read, saw).
    Delete {
        key: String,
        #[command(flatten)]
        args: Box<ClientArgs>,
    },
    /// Inspect a cluster without changing it.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create the cluster CA in DIR: ca.pem and ca.key (mode 0600), and the cluster secret
    /// cluster.secret (mode 0600) unless one exists.
    Init {
        /// Directory for the CA files (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Replace an existing CA. Every certificate the old CA issued stops working.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the CA in DIR.
    Issue {
        /// Directory holding ca.pem and ca.key; the new files are written there too.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[command(flatten)]
        subject: Subject,
        /// Replace an existing certificate and key of the same name.
        #[arg(long)]
        force: bool,
    },
    /// Write a new cluster secret (mode 0600), which seals client contexts: DIR/cluster.secret,
    /// or --out FILE. Every node needs the same one; clients never do.
    Secret {
        /// Directory to write cluster.secret in.
        #[arg(long, value_name = "DIR", required_unless_present = "out")]
        dir: Option<PathBuf>,
        /// The file to write instead (for a rotation: a new secret next to the current one).
        #[arg(long, value_name = "FILE", conflicts_with = "dir")]
        out: Option<PathBuf>,
        /// Replace an existing file. Contexts sealed with the old secret stop working unless
        /// the nodes keep it in tls.cluster_secret_previous.
        #[arg(long)]
        force: bool,
    },
}

/// Whom a certificate is for: exactly one of a node or a client.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Subject {
    /// A node certificate for node ID (files node-ID.pem, node-ID.key).
    #[arg(long, value_name = "ID")]
    node: Option<NodeId>,
    /// A client certificate for NAME (files client-NAME.pem, client-NAME.key).
    #[arg(long, value_name = "NAME")]
    client: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Load and validate a configuration, check its TLS files, and print it with every
    /// default filled in.
    Check {
        // Boxed: the overrides are large next to every other subcommand's arguments.
        #[command(flatten)]
        config: Box<ConfigArgs>,
        /// Do not read the TLS files (validate the configuration alone).
        #[arg(long)]
        skip_tls: bool,
    },
}

/// mimalloc instead of the system allocator: the node allocates and frees many small buffers
/// per request (frames, key states, stream state), and glibc's malloc spent about a fifth of
/// the node's CPU on them under load (see BENCHMARKS.md, "What the profile showed").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    let client_command = matches!(
        cli.command,
        Command::Put { .. } | Command::Get { .. } | Command::Delete { .. } | Command::Admin(_)
    );
    // The client library says at `info` when it marks a node down or up: news in a service's
    // log, noise in a shell command's stderr.
    init_tracing(if client_command { "warn" } else { "info" });
    // The client commands and `dev` choose their own exit codes (see their modules).
    let cli = match cli.command {
        Command::Dev(args) => {
            return exit(runtime().map(|rt| rt.block_on(quorumkv_node::dev::run(args))))
        }
        Command::Put {
            key,
            value,
            value_file,
            args,
        } => {
            let value = match (value, value_file) {
                (Some(value), _) => value.into_bytes(),
                (None, Some(path)) => match read_value(&path) {
                    Ok(bytes) => bytes,
                    Err(code) => {
                        return ExitCode::from(
                            u8::try_from(args.fail_reading(&path, &code)).unwrap_or(1),
                        )
                    }
                },
                (None, None) => unreachable!("clap requires VALUE or --value-file"),
            };
            return exit(runtime().map(|rt| rt.block_on(run_put(&args, &key, &value))));
        }
        Command::Get { key, output, args } => {
            return exit(runtime().map(|rt| rt.block_on(run_get(&args, &key, output.as_deref()))))
        }
        Command::Delete { key, args } => {
            return exit(runtime().map(|rt| rt.block_on(run_delete(&args, &key))))
        }
        Command::Admin(command) => {
            return exit(runtime().map(|rt| rt.block_on(run_admin(&command))))
        }
        command => Cli { command },
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("quorumkv: {}{}", one_line(&format!("{err:#}")), hint(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Certs(command) => run_certs(command),
        Command::Config(command) => run_config(command),
        Command::Start { config } => run_start(&config),
        Command::Dev(_)
        | Command::Put { .. }
        | Command::Get { .. }
        | Command::Delete { .. }
        | Command::Admin(_) => anyhow::bail!("handled before run"),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// The node's runtime: `worker_threads` threads (0: tokio's default, one per CPU).
fn node_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder.enable_all().build()
}

/// The bytes of `path`, or of standard input for `-`.
fn read_value(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)?;
        Ok(bytes)
    } else {
        std::fs::read(path)
    }
}

fn exit(code: std::io::Result<i32>) -> ExitCode {
    match code {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("quorumkv: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_start(config: &ConfigArgs) -> anyhow::Result<()> {
    let config = config.load()?;
    tls::check_node_files(&config.tls, &config.node_id)?;
    let prometheus = install_metrics()?;
    let runtime = node_runtime(config.worker_threads).context("starting the async runtime")?;
    runtime.block_on(quorumkv_node::server::run(
        config,
        Some(prometheus),
        quorumkv_node::server::shutdown_signal(),
    ))?;
    Ok(())
}

/// Installs the Prometheus recorder with the project's explicit latency buckets.
fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            quorumkv_node::metrics::LATENCY_BUCKETS_SECONDS,
        )
        .context("configuring metric buckets")?
        .set_buckets_for_metric(
            Matcher::Full(quorumkv_node::metrics::READ_SIBLINGS.into()),
            quorumkv_node::metrics::SIBLING_BUCKETS,
        )
        .context("configuring metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    quorumkv_node::metrics::describe();
    Ok(handle)
}

fn run_certs(command: CertsCommand) -> anyhow::Result<()> {
    let if_exists = |force| {
        if force {
            IfExists::Overwrite
        } else {
            IfExists::Refuse
        }
    };
    let paths = match command {
        CertsCommand::Init { dir, force } => {
            certs::init_ca(&dir, if_exists(force)).context("creating the cluster CA")?
        }
        CertsCommand::Issue {
            dir,
            subject,
            force,
        } => match (subject.node, subject.client) {
            (Some(id), _) => certs::issue_node(&dir, &id, if_exists(force))
                .with_context(|| format!("issuing a certificate for node {id}"))?,
            (None, Some(name)) => certs::issue_client(&dir, &name, if_exists(force))
                .with_context(|| format!("issuing a certificate for client {name}"))?,
            // clap's group makes exactly one of them required.
            (None, None) => anyhow::bail!("give --node ID or --client NAME"),
        },
        CertsCommand::Secret { dir, out, force } => {
            let path = match (out, dir) {
                (Some(out), _) => out,
                (None, Some(dir)) => certs::cluster_secret_path(&dir),
                (None, None) => anyhow::bail!("give --dir DIR or --out FILE"),
            };
            let secret = certs::write_cluster_secret(&path, if_exists(force))
                .context("writing the cluster secret")?;
            println!("{}", path.display());
            eprintln!("cluster secret {} written", secret.id());
            return Ok(());
        }
    };
    println!("{}", paths.cert.display());
    println!("{}", paths.key.display());
    Ok(())
}

fn run_config(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Check { config, skip_tls } => {
            let config = config.load()?;
            if !skip_tls {
                tls::check_node_files(&config.tls, &config.node_id)?;
                certs::load_context_keys(&config.tls)?;
            }
            print!("{}", config.to_toml()?);
            Ok(())
        }
    }
}

/// Prints a clap error as one line (keeping clap's tips) and picks the exit code: 0 for
/// `--help` and `--version`, 2 for usage errors.
fn usage_error(err: &clap::Error) -> ExitCode {
    if !err.use_stderr() {
        // --help or --version: clap's output is the point; print it whole.
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    if err.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // A bare `quorumkv` or `quorumkv certs`: the help is the useful answer.
        let _ = err.print();
        return ExitCode::from(2);
    }
    let rendered = err.render().to_string();
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    let tips: Vec<&str> = lines.filter(|l| l.starts_with("tip:")).collect();
    let mut message = first.to_owned();
    for tip in tips {
        message.push_str("; ");
        message.push_str(tip);
    }
    eprintln!("quorumkv: {message} (see --help)");
    ExitCode::from(2)
}

/// 2 when the operator's input was wrong: a bad or inconsistent config, a name, certificate
/// files that are missing or do not fit, a file that exists without --force. 1 otherwise.
fn exit_code(err: &anyhow::Error) -> u8 {
    let invalid_input = err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<Error>(),
            Some(
                Error::Config { .. }
                    | Error::ConfigFile { .. }
                    | Error::InvalidClientName { .. }
                    | Error::CertificateFile { .. }
                    | Error::CertificateExists { .. }
                    | Error::Tls { .. }
            )
        )
    });
    if invalid_input {
        2
    } else {
        1
    }
}

/// What the operator can do about an error, where the binary knows better than the library.
fn hint(err: &anyhow::Error) -> &'static str {
    let exists = err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<Error>(),
            Some(Error::CertificateExists { .. })
        )
    });
    if exists {
        " (pass --force to replace it)"
    } else {
        ""
    }
}

/// Error messages from libraries occasionally span lines; an operator's log wants one.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal; node logs usually go to files and journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn admin_replicas_takes_a_key_the_keyspace_and_the_client_flags() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        let tls = [
            "--nodes", "a:1", "--ca", "ca.pem", "--cert", "c.pem", "--key", "c.key",
        ];
        let mut args = vec![
            "quorumkv",
            "admin",
            "replicas",
            "k",
            "--keyspace",
            "ks",
            "--json",
        ];
        args.extend(tls);
        match parse(&args).map(|cli| cli.command) {
            Ok(Command::Admin(AdminCommand::Replicas(replicas))) => {
                assert_eq!(replicas.key, "k");
                assert_eq!(replicas.keyspace, "ks");
                assert!(replicas.json);
                assert_eq!(replicas.connect.nodes, ["a:1"]);
                assert_eq!(replicas.connect.tls_key, PathBuf::from("c.key"));
            }
            other => panic!("expected admin replicas, got {other:?}"),
        }
        // `--r`, `--w` and the other data-request flags do not belong to an inspection.
        let mut with_r = args.clone();
        with_r.extend(["--r", "2"]);
        assert!(parse(&with_r).is_err());
    }

    #[test]
    fn issue_needs_exactly_one_subject() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        assert!(parse(&["quorumkv", "certs", "issue", "--dir", "d", "--node", "n1"]).is_ok());
        assert!(parse(&["quorumkv", "certs", "issue", "--dir", "d", "--client", "c"]).is_ok());
        assert!(parse(&["quorumkv", "certs", "issue", "--dir", "d"]).is_err());
        let both = [
            "quorumkv", "certs", "issue", "--dir", "d", "--node", "n1", "--client", "c",
        ];
        assert!(parse(&both).is_err());
        assert!(parse(&["quorumkv", "certs", "issue", "--dir", "d", "--node", "N1"]).is_err());
        assert!(parse(&["quorumkv", "certs", "secret", "--dir", "d"]).is_ok());
        assert!(parse(&["quorumkv", "certs", "secret", "--out", "f"]).is_ok());
        assert!(parse(&["quorumkv", "certs", "secret"]).is_err());
        assert!(parse(&["quorumkv", "certs", "secret", "--dir", "d", "--out", "f"]).is_err());
    }

    #[test]
    fn invalid_input_exits_2_and_the_rest_1() {
        let config = anyhow::Error::new(Error::Config {
            field: "ranges".into(),
            reason: "bad".into(),
        });
        assert_eq!(exit_code(&config.context("loading")), 2);
        let exists = anyhow::Error::new(Error::CertificateExists {
            path: "ca.pem".into(),
        });
        assert_eq!(exit_code(&exists), 2);
        let failed = anyhow::Error::new(Error::Certificate {
            reason: "signing failed".into(),
        });
        assert_eq!(exit_code(&failed), 1);
        assert_eq!(one_line("a\n  b\tc"), "a b c");
    }
}
