//! A frame that claims a length and then stalls, or ends early, costs the reader only the
//! bytes that arrived (plus one read chunk), not the length it claimed; and a stall is cut off
//! at the frame deadline. This is the reader every stream of a node (and of the client) uses,
//! `quorumkv_client::frame_io::read_frame`.
//!
//! Like `fuzz_alloc.rs`, this binary counts allocations with `stats_alloc`'s wrapper of the
//! system allocator, and runs the reader on a current-thread runtime so that nothing else
//! allocates meanwhile.

use quorumkv_client::frame::PROTOCOL_VERSION;
use quorumkv_client::frame_io::{read_frame, Deadline, FrameSource, ReadFrameError};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::time::Duration;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The frame cap of a node with the default 1 MiB values, rounded up: 16 MiB.
const FRAME_BYTES_MAX: u32 = 16 << 20;

/// A stream that sends a header claiming `claimed` body bytes, then `sent` bytes of body, then
/// stalls for ever (`stall`) or ends.
struct Liar {
    pending: Vec<u8>,
    stall: bool,
}

impl Liar {
    fn new(claimed: u32, sent: usize, stall: bool) -> Liar {
        let mut pending = vec![PROTOCOL_VERSION];
        pending.extend_from_slice(&claimed.to_be_bytes());
        pending.extend(std::iter::repeat_n(0x42, sent));
        Liar { pending, stall }
    }
}

impl FrameSource for Liar {
    type Error = std::convert::Infallible;

    async fn read_some(&mut self, buf: &mut [u8]) -> Result<Option<usize>, Self::Error> {
        if self.pending.is_empty() {
            if self.stall {
                std::future::pending::<()>().await;
            }
            return Ok(None);
        }
        let n = buf.len().min(self.pending.len()).min(1500);
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(Some(n))
    }
}

/// The allocation counter is process-wide: each test holds this for its whole run (building
/// its input included), or the tests would count each other's allocations.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads one frame from `source` and returns the outcome and the bytes requested from the
/// allocator meanwhile.
fn read_counting(
    mut source: Liar,
    timeout: Duration,
) -> (
    Result<Vec<u8>, ReadFrameError<std::convert::Infallible>>,
    usize,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let region = Region::new(GLOBAL);
    let outcome = runtime.block_on(read_frame(
        &mut source,
        FRAME_BYTES_MAX,
        timeout,
        Deadline::FromNow,
    ));
    let allocated = region.change().bytes_allocated;
    (outcome, allocated)
}

/// What a reader may hold beyond the bytes that arrived: one read chunk and the runtime's own
/// small allocations (timers, wakers).
const SLACK_BYTES: usize = quorumkv_client::frame_io::READ_CHUNK_BYTES + 64 * 1024;

#[test]
fn a_frame_that_claims_16_mib_and_stalls_costs_what_arrived_and_times_out() {
    let _turn = one_at_a_time();
    let sent = 1000;
    let (outcome, allocated) = read_counting(
        Liar::new(FRAME_BYTES_MAX, sent, true),
        Duration::from_millis(50),
    );
    match outcome {
        Err(ReadFrameError::TimedOut { received, claimed }) => {
            assert_eq!(received, 5 + sent);
            assert_eq!(claimed, Some(FRAME_BYTES_MAX as usize));
        }
        other => panic!("expected the stall cut off, got {other:?}"),
    }
    assert!(
        allocated <= 2 * sent + SLACK_BYTES,
        "a stalled frame that claims {FRAME_BYTES_MAX} bytes and sent {sent} cost {allocated} bytes"
    );
}

#[test]
fn a_frame_that_lies_about_its_length_costs_what_arrived() {
    let _turn = one_at_a_time();
    let sent = 300_000;
    let (outcome, allocated) = read_counting(
        Liar::new(FRAME_BYTES_MAX, sent, false),
        Duration::from_secs(60),
    );
    assert!(
        matches!(outcome, Err(ReadFrameError::Truncated { received }) if received == 5 + sent),
        "{outcome:?}"
    );
    // Growing by doubling requests at most twice what arrived, in all, plus a chunk.
    assert!(
        allocated <= 4 * sent + SLACK_BYTES,
        "a frame that claims {FRAME_BYTES_MAX} bytes and sent {sent} cost {allocated} bytes"
    );
}

#[test]
fn an_honest_frame_is_read_whole() {
    let _turn = one_at_a_time();
    let sent = 2_000_000;
    let (outcome, allocated) = read_counting(
        Liar::new(u32::try_from(sent).expect("small"), sent, false),
        Duration::from_secs(60),
    );
    let body = outcome.expect("a whole frame");
    assert_eq!(body.len(), sent);
    assert!(body.iter().all(|b| *b == 0x42));
    assert!(allocated <= 4 * sent + SLACK_BYTES, "{allocated} bytes");
}
