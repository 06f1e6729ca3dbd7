//! No decoder of untrusted bytes allocates beyond what its input backs.
//!
//! A length field is a promise the sender makes and need not keep: a 10-byte input can carry a
//! MessagePack array header that announces four billion elements. A decoder that reserves
//! memory for the announced length instead of the bytes it holds turns every small hostile
//! message into a large allocation: a node that reads a thousand such frames a second
//! reserves gigabytes a second, however small its frame cap.
//!
//! # What is measured
//!
//! This binary replaces the global allocator with `stats_alloc`'s counting wrapper of the
//! system allocator (a counting allocator needs `unsafe`, which the workspace forbids in our own
//! code). Around each decode it reads how many bytes were requested from the allocator, fresh
//! allocations plus the growth of reallocations, whether or not they were freed again before
//! the decode returned. That total bounds the decode's peak memory from above, so it catches a
//! reservation that is made and released again on the error path, which a look at memory after
//! the decode would miss.
//!
//! # The bound
//!
//! For an input of `n` bytes, every decoder must stay within
//! `BYTES_PER_INPUT_BYTE · n + SLACK_BYTES` requested bytes. The per-byte factor is
//! not 1 because a decoded value legitimately takes more room than its encoding: a one-byte
//! MessagePack element becomes a 64-byte `Sibling` slot of a `Vec`, a 16-byte `Dot` in a
//! B-tree node, or a `String` header; a decoder of canonical bytes also encodes its result
//! again to compare. The slack pays for fixed costs (an error message, the first B-tree node,
//! the X.509 parser's bookkeeping). What the bound excludes is any allocation sized by what the
//! input *claims* rather than what it *holds*: such an allocation is at least tens of kilobytes
//! for a header of a few bytes (serde reserves up to 1 MiB for a sequence whose length it is
//! told) and breaks the bound by orders of magnitude. With a frame cap `C`, a decode therefore
//! requests at most `BYTES_PER_INPUT_BYTE · C + SLACK_BYTES`, whatever the headers say.
//!
//! # The inputs
//!
//! The same as `fuzz_decoders.rs` (see `fuzz/mod.rs`), plus one deterministic sweep: for
//! generated values of every message, every length field in turn (each string, byte string,
//! array and map header) is rewritten to claim up to 4 G, and the result decoded.
//!
//! The counters are global, so this binary holds exactly one `#[test]`: a second test running
//! on another thread would charge its allocations to the decode being measured.
//! `QUORUMKV_FUZZ_CASES` and `QUORUMKV_FUZZ_SEED` lengthen and vary the run as for the other
//! fuzz targets.

mod fuzz;

use fuzz::targets::*;
use fuzz::*;
use proptest::prelude::*;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::cell::Cell;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes a decoder may request per byte of input.
const BYTES_PER_INPUT_BYTE: usize = 96;
/// Bytes a decoder may request whatever the input's size.
const SLACK_BYTES: usize = 16 << 10;

/// Cases per target for random inputs, and generated values per target for the sweep.
const CASES: u32 = 8192;
const SWEEP_VALUES: u32 = 128;
const CERT_CASES: u32 = 1024;

/// The lengths the sweep writes into each length field.
const HUGE_CLAIMS: [u32; 4] = [u32::MAX, 1 << 31, 1 << 20, 65_536];

fn bound(input_len: usize) -> usize {
    BYTES_PER_INPUT_BYTE * input_len + SLACK_BYTES
}

/// Bytes requested from the allocator (allocations and reallocation growth) while `decode`
/// runs on `input`.
fn requested_by(decode: fn(&[u8]) -> bool, input: &[u8]) -> usize {
    let region = Region::new(GLOBAL);
    std::hint::black_box(decode(std::hint::black_box(input)));
    region.change().bytes_allocated
}

/// The largest allocation seen, relative to the input, for the summary line.
#[derive(Clone, Copy, Default)]
struct Worst {
    requested: usize,
    input_len: usize,
}

fn within_bound(target: &Target, input: &[u8], worst: &Cell<Worst>) -> Result<(), TestCaseError> {
    let requested = requested_by(target.decode, input);
    let excess = |w: Worst| w.requested.saturating_sub(bound(w.input_len));
    let seen = Worst {
        requested,
        input_len: input.len(),
    };
    if requested > worst.get().requested {
        worst.set(seen);
    }
    prop_assert!(
        requested <= bound(input.len()),
        "{} requested {} bytes decoding {} bytes (bound {}, {} over): {:02x?}",
        target.name,
        requested,
        input.len(),
        bound(input.len()),
        excess(seen),
        &input[..input.len().min(64)]
    );
    Ok(())
}

fn random_inputs(target: &Target) {
    let worst = Cell::new(Worst::default());
    let cases = if target.name == IDENTITY.name {
        CERT_CASES
    } else {
        CASES
    };
    run(target.name, config(cases), inputs(target), |input| {
        within_bound(target, &input, &worst)
    });
    let w = worst.get();
    println!(
        "{:40} random: at most {:>7} bytes requested (for a {:>5}-byte input)",
        target.name, w.requested, w.input_len
    );
}

fn every_length_field_claims_gigabytes(target: &Target) {
    let worst = Cell::new(Worst::default());
    let probes = Cell::new(0usize);
    // Each value gives a hundred or so probes, so a long run sweeps fewer values than it
    // draws random inputs.
    let values = ProptestConfig {
        cases: cases(CASES) / (CASES / SWEEP_VALUES),
        ..config(SWEEP_VALUES)
    };
    run(target.name, values, (target.valid)(), |payload| {
        for nth in 0..length_field_count(&payload) {
            for claim in HUGE_CLAIMS {
                let mut damaged = payload.clone();
                relength(&mut damaged, nth, claim);
                within_bound(target, &(target.wrap)(damaged), &worst)?;
                probes.set(probes.get() + 1);
            }
        }
        Ok(())
    });
    let w = worst.get();
    println!(
        "{:40} sweep:  at most {:>7} bytes requested (for a {:>5}-byte input), {} probes",
        target.name,
        w.requested,
        w.input_len,
        probes.get()
    );
}

/// The one test of this binary: see the module documentation for why there is only one.
#[test]
fn decoders_allocate_in_proportion_to_their_input() {
    for target in ALL {
        random_inputs(target);
        every_length_field_claims_gigabytes(target);
    }
}
