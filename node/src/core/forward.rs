//! Forwarding: a node that is not a replica of a key hands the request to one that is.
//!
//! Version vectors only ever name a key's owners, so only a replica coordinates (Dynamo §4.5).
//! The forwarding node picks the first replica it believes up, waits up to twice the request's
//! timeout (so the coordinator's own `QuorumNotReached` reaches the client rather than our
//! `Unavailable`), and tries the next replica when the one it chose fails or is found down.

use super::{error, join_ids, Checked, ClientHandle, ForwardOp, NodeCore, Now, Op, Origin, Output};
use crate::peer::{OpId, PeerMessage};
use quorumkv_client::protocol::{ErrorKind, Request};
use quorumkv_ring::NodeId;

impl NodeCore {
    pub(super) fn forward(
        &mut self,
        now: Now,
        client: ClientHandle,
        checked: &Checked<'_>,
        request: Request,
        out: &mut Vec<Output>,
    ) {
        let mut candidates: Vec<NodeId> = checked
            .preference_list
            .iter()
            .filter(|node| self.detector.is_up(node))
            .cloned()
            .collect();
        if candidates.is_empty() {
            let message = format!(
                "no replica of this key is reachable from node {} (replicas: {})",
                self.me,
                join_ids(&checked.preference_list)
            );
            return self.answer(
                &Origin::Client(client),
                error(ErrorKind::Unavailable, message),
                out,
            );
        }
        let to = candidates.remove(0);
        let op = self.new_op();
        out.push(Output::Send {
            to: to.clone(),
            message: PeerMessage::Forward {
                op,
                request: request.clone(),
            },
        });
        // The coordinator gets the request's own timeout; allow it that long plus one more to
        // answer, so its QuorumNotReached reaches the client rather than our Unavailable.
        let deadline_ms = now
            .monotonic_ms
            .saturating_add(checked.timeout_ms.saturating_mul(2));
        self.insert_op(
            op,
            Op::Forward(ForwardOp {
                client,
                request,
                to,
                remaining: candidates,
                deadline_ms,
            }),
        );
    }

    pub(super) fn retry_forward(&mut self, op: OpId, out: &mut Vec<Output>) {
        let Some(Op::Forward(forward)) = self.ops.get_mut(&op) else {
            return;
        };
        while !forward.remaining.is_empty() {
            let next = forward.remaining.remove(0);
            if self.detector.is_up(&next) {
                forward.to = next.clone();
                out.push(Output::Send {
                    to: next,
                    message: PeerMessage::Forward {
                        op,
                        request: forward.request.clone(),
                    },
                });
                return;
            }
        }
        let client = forward.client;
        self.remove_op(op);
        let message = "no replica of this key answered the forwarded request".to_string();
        out.push(Output::Reply {
            handle: client,
            response: error(ErrorKind::Unavailable, message),
        });
    }
}
