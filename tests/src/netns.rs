//! Separate hosts on one machine: a network namespace per node, one for the clients, and faults
//! as iptables rules, for the network-fault suite (`tests/tests/netfault.rs`).
//!
//! # The network
//!
//! ```text
//!  namespace qkv-<tag>-<pid>-hub: the clients' host       namespace qkv-<tag>-<pid>-n1
//!    br0 10.213.0.1/24 ─┬─ veth n1 ═══════════════════════ eth0 10.213.0.11/24, lo
//!                       ├─ veth n2 ═══ ... -n2: eth0 10.213.0.12/24, lo
//!                       └─ veth n3 ═══ ... -n3: eth0 10.213.0.13/24, lo
//! ```
//!
//! Every node has its own namespace and address; a bridge joins them. The bridge lives in a
//! namespace of its own, the *hub*, whose bridge address is the clients' source address: the
//! test's client threads enter it ([`Network::enter_hub`]), and so does everything that talks to
//! the nodes (readiness, metrics). Nothing has a default route, so nothing reaches outside, and
//! the root namespace is not touched at all. That last point matters on this machine: Docker
//! runs in the root namespace with a FORWARD policy of DROP and `bridge-nf-call-iptables = 1`,
//! so a bridge there would drop the nodes' traffic to each other, and changing either setting
//! would change the machine for everyone on it. The subnet is the same in every run; it cannot
//! collide, because each run's subnet exists only inside its own namespaces.
//!
//! Nodes start under `ip netns exec <namespace>` ([`Network::launcher`]), which execs the node
//! in the same process, so signals (kill -9, SIGSTOP) reach the node itself.
//!
//! # Faults
//!
//! Each host (the hub included) has a chain `QKV-FAULTS` that its INPUT chain jumps to first.
//! A fault is a set of rules in the *receivers'* chains: dropping on a sender's OUTPUT chain
//! makes `sendmsg` fail with EPERM, which is not how networks lose packets. [`Network::heal`]
//! flushes every chain. The kernel has no `tc netem`, so there is no delay, reordering or
//! duplication here; random loss uses iptables' `statistic` match. A QUIC endpoint sends
//! batches of datagrams as one segmentation-offload packet, which would cross the veths and
//! reach INPUT as one packet (so loss would drop whole batches); UDP segmentation offload is
//! turned off on every veth, so the kernel splits batches before they leave and loss is per
//! datagram.
//!
//! # Privileges
//!
//! Root, `ip` (iproute2), `iptables` and `ethtool`, and a kernel that lets `ip netns add`
//! work. [`tools_or_skip`] checks them and picks the iptables backend that works inside a
//! namespace (the default, then `iptables-nft`, then `iptables-legacy`). When something is
//! missing the test prints `SKIPPED: <reason>` and returns, unless `CI` or
//! `QUORUMKV_REQUIRE_NETNS=1` is set: then it fails, so CI can never skip it silently.
//!
//! # Cleanup
//!
//! Dropping the [`Network`] (also while a test panics) kills every process left in its
//! namespaces and deletes them, which removes the veths and the bridge. Names carry the test
//! process's id, so concurrent runs do not collide; [`Network::create`] first removes the
//! namespaces of earlier runs whose process is gone (a run killed before its guard ran).

use crate::cluster::NodeHost;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};

/// Every name this module creates starts with this.
const PREFIX: &str = "qkv-";
/// The chain each host's INPUT jumps to; faults live here.
const FAULT_CHAIN: &str = "QKV-FAULTS";
/// The bridge in the hub.
const BRIDGE: &str = "br0";
/// A node's interface, inside its namespace.
const NODE_INTERFACE: &str = "eth0";
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";
/// The QUIC and admin ports of every node (each node has an address of its own).
pub const QUIC_PORT: u16 = 7401;
pub const ADMIN_PORT: u16 = 9401;

/// The commands the suite needs, found working.
#[derive(Clone, Debug)]
pub struct Tools {
    /// The iptables command that works inside a namespace here.
    pub iptables: String,
}

/// Whether the environment demands that the suite run (`CI`, or `QUORUMKV_REQUIRE_NETNS=1`).
pub fn required() -> bool {
    crate::required("QUORUMKV_REQUIRE_NETNS")
}

/// The tools, or `None` after [`skip`](crate::skip) said why; panics instead of skipping when
/// [`required`].
pub fn tools_or_skip(test: &str) -> Option<Tools> {
    match Tools::find() {
        Ok(tools) => Some(tools),
        Err(reason) => {
            crate::skip(
                test,
                "network namespaces",
                &reason,
                "QUORUMKV_REQUIRE_NETNS",
            );
            None
        }
    }
}

impl Tools {
    /// Checks root, `ip`, `ethtool` and a working iptables backend inside a scratch namespace.
    pub fn find() -> Result<Tools, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not running as root (network namespaces and iptables need it)".into());
        }
        for (program, package) in [("ip", "iproute2"), ("ethtool", "ethtool")] {
            if run(&[program, "-V"]).is_err() && run(&[program, "--version"]).is_err() {
                return Err(format!(
                    "`{program}` is not installed (Debian's {package}; .ci/run installs it)"
                ));
            }
        }
        let probe = format!("{PREFIX}probe-{}", std::process::id());
        run(&["ip", "netns", "add", &probe]).map_err(|e| format!("`ip netns add` failed: {e}"))?;
        let mut failures = Vec::new();
        let mut found = None;
        for candidate in ["iptables", "iptables-nft", "iptables-legacy"] {
            let rule = [
                "ip",
                "netns",
                "exec",
                &probe,
                candidate,
                "-w",
                "-A",
                "INPUT",
                "-p",
                "udp",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.5",
                "-j",
                "DROP",
            ];
            match run(&rule) {
                Ok(_) => {
                    found = Some(candidate.to_string());
                    break;
                }
                Err(e) => failures.push(format!("{candidate}: {e}")),
            }
        }
        let _ = run(&["ip", "netns", "del", &probe]);
        match found {
            Some(iptables) => Ok(Tools { iptables }),
            None => Err(format!(
                "no iptables works inside a namespace (Debian's iptables; .ci/run installs \
                 it): {}",
                failures.join("; ")
            )),
        }
    }
}

/// Who receives the packets a rule drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Host {
    Hub,
    Node(usize),
}

/// A hub and one namespace per node, torn down on drop (see the module docs).
#[derive(Debug)]
pub struct Network {
    hub: String,
    nodes: Vec<String>,
    iptables: String,
}

impl Network {
    /// Builds the network for `nodes` nodes; `tag` (short, alphanumeric) names the test. Panics
    /// if a step fails, after which dropping the half-built network removes what was made.
    pub fn create(tag: &str, nodes: usize, tools: &Tools) -> Network {
        remove_stale();
        let base = format!("{PREFIX}{tag}-{}", std::process::id());
        let network = Network {
            hub: format!("{base}-hub"),
            nodes: (1..=nodes).map(|i| format!("{base}-n{i}")).collect(),
            iptables: tools.iptables.clone(),
        };
        for namespace in std::iter::once(&network.hub).chain(&network.nodes) {
            must(&["ip", "netns", "add", namespace]);
            must(&["ip", "-n", namespace, "link", "set", "lo", "up"]);
        }
        let hub = network.hub.as_str();
        must(&["ip", "-n", hub, "link", "add", BRIDGE, "type", "bridge"]);
        let hub_address = format!("{}/24", network.client_address());
        must(&["ip", "-n", hub, "addr", "add", &hub_address, "dev", BRIDGE]);
        must(&["ip", "-n", hub, "link", "set", BRIDGE, "up"]);
        for (index, namespace) in network.nodes.iter().enumerate() {
            let port = format!("n{}", index + 1);
            must(&[
                "ip",
                "-n",
                hub,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                NODE_INTERFACE,
                "netns",
                namespace,
            ]);
            must(&["ip", "-n", hub, "link", "set", &port, "master", BRIDGE]);
            must(&["ip", "-n", hub, "link", "set", &port, "up"]);
            let address = format!("{}/24", network.node_address(index));
            must(&[
                "ip",
                "-n",
                namespace,
                "addr",
                "add",
                &address,
                "dev",
                NODE_INTERFACE,
            ]);
            must(&["ip", "-n", namespace, "link", "set", NODE_INTERFACE, "up"]);
            for (inside, device) in [(hub, port.as_str()), (namespace.as_str(), NODE_INTERFACE)] {
                must(&[
                    "ip",
                    "netns",
                    "exec",
                    inside,
                    "ethtool",
                    "-K",
                    device,
                    "tx-udp-segmentation",
                    "off",
                ]);
            }
        }
        for host in network.hosts() {
            network.iptables(host, &["-N", FAULT_CHAIN]);
            network.iptables(host, &["-I", "INPUT", "-j", FAULT_CHAIN]);
        }
        network
    }

    /// The clients' address: the hub's bridge.
    pub fn client_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, 0, 1)
    }

    /// Node `index`'s address (from 0).
    pub fn node_address(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            213,
            0,
            11 + u8::try_from(index).expect("at most 200 nodes"),
        )
    }

    /// How to start a program inside node `index`'s namespace.
    pub fn launcher(&self, index: usize) -> Vec<String> {
        ["ip", "netns", "exec", &self.nodes[index]]
            .map(String::from)
            .to_vec()
    }

    /// Every node's addresses and launcher, for [`crate::cluster::ClusterOptions::hosts`].
    pub fn node_hosts(&self) -> Vec<NodeHost> {
        (0..self.nodes.len())
            .map(|index| NodeHost {
                quic: SocketAddr::from((self.node_address(index), QUIC_PORT)),
                admin: SocketAddr::from((self.node_address(index), ADMIN_PORT)),
                launcher: self.launcher(index),
            })
            .collect()
    }

    /// Moves the calling thread into the hub, the clients' host, until the guard drops.
    /// Threads it starts afterwards (a tokio runtime's workers, for example) start there too.
    pub fn enter_hub(&self) -> HubGuard {
        let original = File::open("/proc/thread-self/ns/net").expect("opening this thread's netns");
        let hub = File::open(format!("{NETNS_DIR}/{}", self.hub)).expect("opening the hub netns");
        nix::sched::setns(&hub, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("entering {}: {e}", self.hub));
        HubGuard { original }
    }

    /// A full partition: nodes in different groups cannot hear each other; clients still reach
    /// every node. Nodes in no group are unaffected.
    pub fn partition(&self, groups: &[Vec<usize>]) {
        for (g, group) in groups.iter().enumerate() {
            for (h, other) in groups.iter().enumerate() {
                if g == h {
                    continue;
                }
                for &receiver in group {
                    for &sender in other {
                        self.drop_from(Host::Node(receiver), self.node_address(sender));
                    }
                }
            }
        }
    }

    /// A one-way partition: `receiver` stops hearing `senders`, which still hear it.
    pub fn one_way(&self, senders: &[usize], receiver: usize) {
        for &sender in senders {
            self.drop_from(Host::Node(receiver), self.node_address(sender));
        }
    }

    /// Cuts node `index` off from its peers and from the clients, both ways.
    pub fn isolate(&self, index: usize) {
        self.iptables(
            Host::Node(index),
            &["-A", FAULT_CHAIN, "-i", NODE_INTERFACE, "-j", "DROP"],
        );
        let address = self.node_address(index);
        for host in self.hosts().filter(|host| *host != Host::Node(index)) {
            self.drop_from(host, address);
        }
    }

    /// Every host (nodes and clients) drops each packet it receives from the network with
    /// `probability`.
    pub fn loss(&self, probability: f64) {
        let probability = format!("{probability:.4}");
        for host in self.hosts() {
            let interface = match host {
                Host::Hub => BRIDGE,
                Host::Node(_) => NODE_INTERFACE,
            };
            self.iptables(
                host,
                &[
                    "-A",
                    FAULT_CHAIN,
                    "-i",
                    interface,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &probability,
                    "-j",
                    "DROP",
                ],
            );
        }
    }

    /// Removes every fault rule.
    pub fn heal(&self) {
        for host in self.hosts() {
            self.iptables(host, &["-F", FAULT_CHAIN]);
        }
    }

    /// The fault rules in force, per host, for logs.
    pub fn rules(&self) -> String {
        let mut text = String::new();
        for host in self.hosts() {
            let listed = run(&self.iptables_command(host, &["-S", FAULT_CHAIN]))
                .unwrap_or_else(|e| format!("({e})"));
            for line in listed.lines().filter(|line| line.starts_with("-A")) {
                text.push_str(&format!("{}: {line}\n", self.namespace(host)));
            }
        }
        text
    }

    fn hosts(&self) -> impl Iterator<Item = Host> {
        std::iter::once(Host::Hub).chain((0..self.nodes.len()).map(Host::Node))
    }

    fn namespace(&self, host: Host) -> &str {
        match host {
            Host::Hub => &self.hub,
            Host::Node(index) => &self.nodes[index],
        }
    }

    fn drop_from(&self, receiver: Host, sender: Ipv4Addr) {
        let source = sender.to_string();
        self.iptables(receiver, &["-A", FAULT_CHAIN, "-s", &source, "-j", "DROP"]);
    }

    fn iptables_command<'a>(&'a self, host: Host, arguments: &[&'a str]) -> Vec<&'a str> {
        let mut command = vec![
            "ip",
            "netns",
            "exec",
            self.namespace(host),
            &self.iptables,
            "-w",
        ];
        command.extend_from_slice(arguments);
        command
    }

    fn iptables(&self, host: Host, arguments: &[&str]) {
        must(&self.iptables_command(host, arguments));
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for namespace in self.nodes.iter().chain(std::iter::once(&self.hub)) {
            remove_namespace(namespace);
        }
    }
}

/// Returns the calling thread to the network namespace it had before [`Network::enter_hub`].
#[derive(Debug)]
pub struct HubGuard {
    original: File,
}

impl Drop for HubGuard {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(&self.original, nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!("netns: returning to the original network namespace failed: {e}");
        }
    }
}

/// Kills whatever still runs in `namespace` and deletes it; reports failures, never panics (it
/// runs in drops).
fn remove_namespace(namespace: &str) {
    if let Ok(pids) = run(&["ip", "netns", "pids", namespace]) {
        for pid in pids
            .lines()
            .filter_map(|line| line.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    if let Err(e) = run(&["ip", "netns", "del", namespace]) {
        eprintln!("netns: deleting {namespace}: {e}");
    }
}

/// Removes namespaces named by this module whose creating process is gone.
fn remove_stale() {
    let Ok(listed) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for name in listed
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        // qkv-<tag>-<pid>-<host> or qkv-probe-<pid>
        let pid = rest
            .split('-')
            .filter_map(|part| part.parse::<u32>().ok())
            .next();
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("netns: removing {name}, left behind by process {pid}");
                remove_namespace(name);
            }
        }
    }
}

/// Runs a command to completion; its stdout, or a description of how it failed.
fn run(command: &[&str]) -> Result<String, String> {
    let (program, arguments) = command.split_first().expect("a command");
    let output = Command::new(program)
        .args(arguments)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{}`: {e}", command.join(" ")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` exited with {}: {}",
            command.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn must(command: &[&str]) -> String {
    run(command).unwrap_or_else(|e| panic!("netns: {e}"))
}
