//! The I/O half of one request: carrying out what `failover` decides.
//!
//! [`Attempts`] owns one request's tasks: a task per attempt that waits for its node's shared
//! dial (aborted when the request no longer needs it; the dial itself goes on), and a task per
//! attempt sent (never aborted: it runs to its answer or its bound, so the client learns how the
//! node fared even after another attempt won). Their reports come back over one channel and are
//! turned into `failover` events; `failover`'s actions are turned into tasks. When the request
//! finishes, attempts still sent lost a hedge and attempts still dialing lost a race, and their
//! nodes become suspect (see `health`).

use crate::connection::{AttemptError, Nodes, Target};
use crate::error::{Error, Result};
use crate::failover::{Action, AttemptId, Event, Failover, Finish, Kind, Outcome, Reason};
use crate::protocol::{ErrorKind, ErrorReply, Response};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// The client's request counters, for [`crate::Client::stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) hedges: AtomicU64,
    pub(crate) connect_races: AtomicU64,
}

/// What an attempt's task reports to its request.
enum Report {
    Connected(quinn::Connection),
    Ended(Result<Response, AttemptError>),
}

/// Aborts a task when dropped: a request that ends (or is dropped) stops waiting for dials.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The I/O half of one request: the tasks that carry out `Failover`'s actions, and what they
/// reported. Dropping it (the request ended, or its future was dropped) stops waiting for dials
/// but leaves sent attempts to run to their end.
pub(crate) struct Attempts<'a> {
    nodes: &'a Arc<Nodes>,
    counters: &'a Counters,
    targets: &'a [Target],
    frame: Arc<[u8]>,
    kind: Kind,
    attempt_timeout: Duration,
    reports: UnboundedSender<(AttemptId, Report)>,
    incoming: UnboundedReceiver<(AttemptId, Report)>,
    /// Reports available at once (a cached connection), handled before waiting for others.
    ready: VecDeque<(AttemptId, Report)>,
    /// Attempts waiting for a dial.
    waiting: HashMap<AttemptId, AbortOnDrop>,
    /// Attempts connected and not sent yet.
    connections: HashMap<AttemptId, quinn::Connection>,
    /// Attempts sent and not answered yet.
    sent: Vec<AttemptId>,
    target_of: HashMap<AttemptId, usize>,
    /// What each finished attempt would make the request return.
    results: HashMap<AttemptId, Result<Response>>,
    /// `(attempt, node, reason)` of every connection-level failure.
    unreachable: Vec<(AttemptId, String, String)>,
}

impl<'a> Attempts<'a> {
    pub(crate) fn new(
        nodes: &'a Arc<Nodes>,
        counters: &'a Counters,
        targets: &'a [Target],
        frame: Arc<[u8]>,
        kind: Kind,
        attempt_timeout: Duration,
    ) -> Attempts<'a> {
        let (reports, incoming) = tokio::sync::mpsc::unbounded_channel();
        Attempts {
            nodes,
            counters,
            targets,
            frame,
            kind,
            attempt_timeout,
            reports,
            incoming,
            ready: VecDeque::new(),
            waiting: HashMap::new(),
            connections: HashMap::new(),
            sent: Vec::new(),
            target_of: HashMap::new(),
            results: HashMap::new(),
            unreachable: Vec::new(),
        }
    }

    /// Carries out `failover`'s actions and feeds it what happened, until it finishes.
    pub(crate) async fn run(mut self, mut failover: Failover) -> Result<Response> {
        let mut actions = failover.start(Instant::now());
        loop {
            for action in std::mem::take(&mut actions) {
                match action {
                    Action::Connect {
                        attempt,
                        target,
                        reason,
                    } => self.connect(attempt, target, reason),
                    Action::Send(attempt) => self.send(attempt),
                    Action::Abandon(attempt) => self.abandon(attempt),
                    Action::Finish(finish) => return self.finish(finish),
                }
            }
            let (attempt, report) = match self.ready.pop_front() {
                Some(report) => report,
                None => {
                    let deadline = failover.deadline().map(tokio::time::Instant::from_std);
                    tokio::select! {
                        report = self.incoming.recv() => match report {
                            Some(report) => report,
                            // Unreachable: `self` holds a sender.
                            None => continue,
                        },
                        () = sleep_until(deadline) => {
                            actions = failover.on_timer(Instant::now());
                            continue;
                        }
                    }
                }
            };
            let event = self.absorb(attempt, report);
            actions = failover.on_event(Instant::now(), event);
        }
    }

    fn target(&self, attempt: AttemptId) -> &Target {
        &self.targets[self.target_of[&attempt]]
    }

    /// Gets a connection for `attempt`: the cached one at once, or a dial's when it completes.
    fn connect(&mut self, attempt: AttemptId, target: usize, reason: Reason) {
        let nodes = self.nodes;
        let target_ref = &self.targets[target];
        self.note_start(reason, target_ref);
        self.target_of.insert(attempt, target);
        if let Some(connection) = nodes.ready_connection(target_ref) {
            self.ready
                .push_back((attempt, Report::Connected(connection)));
            return;
        }
        let wait = nodes.connection(target_ref);
        let reports = self.reports.clone();
        let task = tokio::spawn(async move {
            let report = match wait.await {
                Ok(connection) => Report::Connected(connection),
                Err(error) => Report::Ended(Err(error)),
            };
            let _ = reports.send((attempt, report));
        });
        self.waiting.insert(attempt, AbortOnDrop(task));
    }

    /// Sends the request on `attempt`'s connection, in a task of its own that is not aborted
    /// with the request, so the client learns how the node fared.
    fn send(&mut self, attempt: AttemptId) {
        let Some(connection) = self.connections.remove(&attempt) else {
            return;
        };
        self.sent.push(attempt);
        let exchange = Arc::clone(self.nodes).exchange(
            self.target(attempt).clone(),
            connection,
            Arc::clone(&self.frame),
            self.attempt_timeout,
            self.kind == Kind::Read,
        );
        let reports = self.reports.clone();
        tokio::spawn(async move {
            let result = exchange.await;
            let _ = reports.send((attempt, Report::Ended(result)));
        });
    }

    /// Stops waiting for `attempt`'s dial: another node's connection got the request.
    fn abandon(&mut self, attempt: AttemptId) {
        if self.waiting.remove(&attempt).is_some() {
            self.nodes.note_lost_race(self.target(attempt));
        }
        self.connections.remove(&attempt);
    }

    /// Records a report and turns it into the event `Failover` reads.
    fn absorb(&mut self, attempt: AttemptId, report: Report) -> Event {
        self.waiting.remove(&attempt);
        let result = match report {
            Report::Connected(connection) => {
                self.connections.insert(attempt, connection);
                return Event::Connected(attempt);
            }
            Report::Ended(result) => result,
        };
        self.sent.retain(|&sent| sent != attempt);
        let outcome = match result {
            Ok(Response::Error(reply)) => {
                let error = reply_error(reply);
                let outcome = if error.is_retryable() {
                    Outcome::Retryable
                } else {
                    Outcome::Answer
                };
                self.results.insert(attempt, Err(error));
                outcome
            }
            Ok(response) => {
                self.results.insert(attempt, Ok(response));
                Outcome::Answer
            }
            Err(AttemptError::Unreachable(reason)) => {
                let node = self.target(attempt).label.clone();
                self.unreachable.push((attempt, node, reason));
                Outcome::Unreachable
            }
            Err(AttemptError::Timeout) => {
                self.results.insert(attempt, Err(Error::Timeout));
                Outcome::Retryable
            }
            Err(AttemptError::Fatal(error)) => {
                self.results.insert(attempt, Err(error));
                Outcome::Answer
            }
        };
        Event::Ended(attempt, outcome)
    }

    /// The request's result. Attempts still sent lost a hedge, and those still dialing lost a
    /// race: their nodes become suspect (see `health`).
    fn finish(mut self, finish: Finish) -> Result<Response> {
        let nodes = self.nodes;
        if let Finish::Answer(winner) = finish {
            for &loser in self.sent.iter().filter(|&&attempt| attempt != winner) {
                nodes.note_lost_hedge(self.target(loser));
            }
            for &loser in self.waiting.keys() {
                nodes.note_lost_race(self.target(loser));
            }
        }
        match finish {
            Finish::Answer(attempt) | Finish::Retryable(attempt) => {
                self.results.remove(&attempt).unwrap_or_else(|| {
                    Err(Error::UnexpectedResponse {
                        reason: "the deciding attempt left no result".into(),
                    })
                })
            }
            Finish::Unreachable => {
                self.unreachable.sort_by_key(|(attempt, _, _)| *attempt);
                Err(Error::NoNodeReachable {
                    attempts: self
                        .unreachable
                        .into_iter()
                        .map(|(_, node, reason)| (node, reason))
                        .collect(),
                })
            }
        }
    }

    /// Counts and logs an attempt that a race or a hedge started.
    fn note_start(&self, reason: Reason, target: &Target) {
        let counters = self.counters;
        match reason {
            Reason::Next => {}
            Reason::ConnectRace => {
                counters.connect_races.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(node = %target.label, "a dial is slow; dialing the next node too");
            }
            Reason::Hedge => {
                counters.hedges.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(node = %target.label, "a read is slow; hedging it to the next node");
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The error a node's [`ErrorReply`] stands for.
pub(crate) fn reply_error(reply: ErrorReply) -> Error {
    let message = reply.message;
    match reply.kind {
        ErrorKind::InvalidRequest => Error::InvalidRequest { message },
        ErrorKind::QuorumNotReached => {
            let (required, acked, durable_required, durable_acked) = reply
                .quorum
                .map(|q| (q.required, q.acked, q.durable_required, q.durable_acked))
                .unwrap_or_default();
            Error::QuorumNotReached {
                required,
                acked,
                durable_required,
                durable_acked,
                message,
            }
        }
        ErrorKind::Overloaded => Error::Overloaded { message },
        ErrorKind::Unavailable => Error::Unavailable { message },
        ErrorKind::Internal => Error::Internal { message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::QuorumShortfall;

    #[test]
    fn replies_map_to_errors_with_their_shortfall() {
        let error = reply_error(ErrorReply {
            kind: ErrorKind::QuorumNotReached,
            message: "1 of 2".into(),
            quorum: Some(QuorumShortfall {
                required: 2,
                acked: 1,
                durable_required: 1,
                durable_acked: 1,
            }),
        });
        assert!(matches!(
            error,
            Error::QuorumNotReached {
                required: 2,
                acked: 1,
                durable_required: 1,
                durable_acked: 1,
                ..
            }
        ));
        assert!(!error.is_retryable());
        for (kind, retryable) in [
            (ErrorKind::InvalidRequest, false),
            (ErrorKind::Overloaded, true),
            (ErrorKind::Unavailable, true),
            (ErrorKind::Internal, false),
        ] {
            let error = reply_error(ErrorReply {
                kind,
                message: String::new(),
                quorum: None,
            });
            assert_eq!(error.is_retryable(), retryable, "{kind:?}");
        }
    }
}
