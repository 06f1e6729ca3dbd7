//! Reading one frame off a stream: incrementally, and within a deadline.
//!
//! [`crate::frame`] checks a frame's five header bytes before anything is allocated for its
//! body, so a frame can never claim more than the receiver's `max_frame_bytes`. That cap is
//! not enough on its own: a reader that allocates the claimed length at once lets a peer that
//! sends five bytes, and nothing more, pin `max_frame_bytes` of memory for as long as it keeps
//! the stream open, and a thousand such streams pin a thousand times that. So
//! [`read_frame`]:
//!
//! - **grows the body with the bytes that arrive**, never ahead of them: it reads in chunks of
//!   at most [`READ_CHUNK_BYTES`], and the buffer's capacity stays within twice what has
//!   arrived plus one chunk, capped by the claimed length; and
//! - **puts a deadline on the frame**: the whole frame must arrive within `timeout` of its
//!   first byte ([`Deadline::FromFirstByte`], for long-lived streams that carry frame after
//!   frame and may rightly be idle between them) or of the call ([`Deadline::FromNow`], for a
//!   stream opened to carry one frame). A frame that stalls ends in
//!   [`ReadFrameError::TimedOut`], and the caller closes the stream.
//!
//! The reader is generic over [`FrameSource`] (implemented for quinn's `RecvStream`) so that
//! tests can drive it with a stream that lies about its length or stalls.

use crate::error::Error;
use crate::frame::{decode_header, FRAME_HEADER_LEN};
use std::future::Future;
use std::time::Duration;

/// The default time a frame has to arrive whole (`timeouts.frame_read_timeout_ms` on nodes).
pub const FRAME_READ_TIMEOUT_DEFAULT_MS: u64 = 10_000;

/// The most bytes read (and allocated ahead of arrival) at once.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Where a frame's deadline starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// At the call: the stream exists to carry this frame (a client request or response, a
    /// hello), so waiting for its first byte counts too.
    FromNow,
    /// At the frame's first byte: a long-lived stream may be idle between frames (the
    /// connection's idle timeout bounds that), but not inside one.
    FromFirstByte,
}

/// A stream of bytes frames are read from.
pub trait FrameSource {
    /// How reading fails.
    type Error;
    /// Reads some bytes into `buf` (which is never empty): `Some(n)` with `n > 0`, or `None`
    /// once the stream has ended.
    fn read_some(
        &mut self,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<Option<usize>, Self::Error>> + Send;
}

impl FrameSource for quinn::RecvStream {
    type Error = quinn::ReadError;

    fn read_some(
        &mut self,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<Option<usize>, quinn::ReadError>> + Send {
        self.read(buf)
    }
}

/// How reading a frame failed.
#[derive(Debug)]
pub enum ReadFrameError<E> {
    /// The stream ended cleanly before the first byte of a frame.
    Ended,
    /// The stream ended inside a frame, after `received` of its bytes (header included).
    Truncated { received: usize },
    /// The header was refused (an unknown version, a length over the cap); nothing was
    /// allocated for the body.
    Refused(Error),
    /// The frame did not arrive whole in time: `received` bytes came (header included), of
    /// the `claimed` body length if the header had arrived.
    TimedOut {
        received: usize,
        claimed: Option<usize>,
    },
    /// The stream failed.
    Stream(E),
}

impl<E: std::fmt::Display> std::fmt::Display for ReadFrameError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFrameError::Ended => f.write_str("the stream ended before a frame"),
            ReadFrameError::Truncated { received } => {
                write!(f, "the stream ended after {received} bytes of a frame")
            }
            ReadFrameError::Refused(e) => write!(f, "{e}"),
            ReadFrameError::TimedOut {
                received,
                claimed: Some(claimed),
            } => write!(
                f,
                "the frame did not arrive in time: {received} bytes of {} came",
                claimed + FRAME_HEADER_LEN
            ),
            ReadFrameError::TimedOut { received, .. } => write!(
                f,
                "the frame did not arrive in time: {received} bytes of its header came"
            ),
            ReadFrameError::Stream(e) => write!(f, "stream: {e}"),
        }
    }
}

/// What has arrived of a frame so far; it outlives a timed-out read so the error can say how
/// much came.
#[derive(Default)]
struct Partial {
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    claimed: Option<usize>,
    body: Vec<u8>,
    body_len: usize,
}

impl Partial {
    fn received(&self) -> usize {
        self.header_len + self.body_len
    }
}

/// Reads one frame's body from `source`: the header is checked against `max_frame_bytes`
/// before anything is allocated, the body grows only with the bytes that arrive, and the
/// whole frame must arrive within `timeout` of `deadline`'s start.
pub async fn read_frame<S: FrameSource>(
    source: &mut S,
    max_frame_bytes: u32,
    timeout: Duration,
    deadline: Deadline,
) -> Result<Vec<u8>, ReadFrameError<S::Error>> {
    let mut partial = Partial::default();
    if deadline == Deadline::FromFirstByte {
        read_header_bytes(source, &mut partial, 1).await?;
    }
    let outcome =
        tokio::time::timeout(timeout, read_rest(source, &mut partial, max_frame_bytes)).await;
    match outcome {
        Ok(result) => result,
        Err(_) => Err(ReadFrameError::TimedOut {
            received: partial.received(),
            claimed: partial.claimed,
        }),
    }
}

/// Reads header bytes until at least `until` of them have arrived.
async fn read_header_bytes<S: FrameSource>(
    source: &mut S,
    partial: &mut Partial,
    until: usize,
) -> Result<(), ReadFrameError<S::Error>> {
    while partial.header_len < until {
        match source
            .read_some(&mut partial.header[partial.header_len..])
            .await
        {
            Ok(Some(n)) => partial.header_len += n,
            Ok(None) if partial.header_len == 0 => return Err(ReadFrameError::Ended),
            Ok(None) => {
                return Err(ReadFrameError::Truncated {
                    received: partial.header_len,
                })
            }
            Err(e) => return Err(ReadFrameError::Stream(e)),
        }
    }
    Ok(())
}

async fn read_rest<S: FrameSource>(
    source: &mut S,
    partial: &mut Partial,
    max_frame_bytes: u32,
) -> Result<Vec<u8>, ReadFrameError<S::Error>> {
    read_header_bytes(source, partial, FRAME_HEADER_LEN).await?;
    let len = decode_header(partial.header, max_frame_bytes).map_err(ReadFrameError::Refused)?;
    partial.claimed = Some(len);
    while partial.body_len < len {
        let want = (len - partial.body_len).min(READ_CHUNK_BYTES);
        let start = partial.body_len;
        grow_for(&mut partial.body, start + want, len);
        partial.body.resize(start + want, 0);
        let read = source.read_some(&mut partial.body[start..]).await;
        match read {
            Ok(Some(n)) => {
                partial.body_len += n;
                partial.body.truncate(partial.body_len);
            }
            Ok(None) => {
                return Err(ReadFrameError::Truncated {
                    received: partial.received(),
                })
            }
            Err(e) => return Err(ReadFrameError::Stream(e)),
        }
    }
    Ok(std::mem::take(&mut partial.body))
}

/// Makes room for `needed` bytes in `body`, doubling what is there at most and never beyond
/// `cap` (the claimed length): capacity follows the bytes that arrived, not the claim.
fn grow_for(body: &mut Vec<u8>, needed: usize, cap: usize) {
    if body.capacity() >= needed {
        return;
    }
    let target = body.capacity().saturating_mul(2).max(needed).min(cap);
    body.reserve_exact(target.saturating_sub(body.len()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, PROTOCOL_VERSION};
    use std::collections::VecDeque;

    /// A stream that yields its chunks one by one, then ends or stalls for ever.
    struct Script {
        chunks: VecDeque<Vec<u8>>,
        stall: bool,
    }

    impl FrameSource for Script {
        type Error = std::convert::Infallible;

        async fn read_some(&mut self, buf: &mut [u8]) -> Result<Option<usize>, Self::Error> {
            let Some(mut chunk) = self.chunks.pop_front() else {
                if self.stall {
                    std::future::pending::<()>().await;
                }
                return Ok(None);
            };
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            if n < chunk.len() {
                self.chunks.push_front(chunk.split_off(n));
            }
            Ok(Some(n))
        }
    }

    fn script(chunks: Vec<Vec<u8>>, stall: bool) -> Script {
        Script {
            chunks: chunks.into(),
            stall,
        }
    }

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_frame_in_small_pieces_is_read_whole() {
        let frame = encode_frame(&vec![7u8; 200_000], 1 << 20).unwrap();
        let pieces = frame.chunks(777).map(<[u8]>::to_vec).collect();
        let body = read_frame(&mut script(pieces, false), 1 << 20, LONG, Deadline::FromNow)
            .await
            .unwrap();
        assert_eq!(body, frame[FRAME_HEADER_LEN..]);
    }

    #[tokio::test]
    async fn ends_and_truncations_are_told_apart() {
        let err = read_frame(
            &mut script(vec![], false),
            100,
            LONG,
            Deadline::FromFirstByte,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ReadFrameError::Ended), "{err}");
        let header = vec![PROTOCOL_VERSION, 0, 0, 0, 10, 1, 2];
        let err = read_frame(
            &mut script(vec![header], false),
            100,
            LONG,
            Deadline::FromNow,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, ReadFrameError::Truncated { received: 7 }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_oversized_header_is_refused_before_any_body_is_read() {
        let header = vec![PROTOCOL_VERSION, 0, 0, 1, 0];
        let err = read_frame(
            &mut script(vec![header], true),
            255,
            LONG,
            Deadline::FromNow,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ReadFrameError::Refused(_)), "{err}");
    }

    #[tokio::test]
    async fn a_stalled_frame_times_out_and_says_how_much_came() {
        let mut header = vec![PROTOCOL_VERSION];
        header.extend_from_slice(&(1u32 << 20).to_be_bytes());
        let chunks = vec![header, vec![1; 10]];
        let err = read_frame(
            &mut script(chunks, true),
            1 << 20,
            Duration::from_millis(20),
            Deadline::FromFirstByte,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                ReadFrameError::TimedOut {
                    received: 15,
                    claimed: Some(1_048_576)
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn capacity_follows_what_arrived() {
        let mut body = Vec::new();
        grow_for(&mut body, 10, 1 << 20);
        assert!(body.capacity() < 1024, "{}", body.capacity());
        body.resize(10, 0);
        grow_for(&mut body, 10 + READ_CHUNK_BYTES, 1 << 20);
        assert!(body.capacity() <= 2 * (10 + READ_CHUNK_BYTES));
        grow_for(&mut body, 1 << 20, 1 << 20);
        assert!(body.capacity() <= 1 << 20 || body.capacity() < (1 << 20) + 64);
    }
}
