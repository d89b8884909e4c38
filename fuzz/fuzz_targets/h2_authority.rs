//! The `:authority` adapter's rewriter on arbitrary client bytes, fed in arbitrary pieces: it
//! must return an error or output, never panic, and never hold back more than one header frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sigil::h2_authority::{Rewriter, MAX_FRAME_PAYLOAD};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    // The first byte picks the piece size, the rest follows a valid preface.
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(body);
    let mut rewriter = Rewriter::new();
    let mut out = Vec::new();
    let mut pending = Vec::new();
    for chunk in input.chunks(step) {
        pending.extend_from_slice(chunk);
        match rewriter.process(&pending, &mut out) {
            Ok(used) => {
                pending.drain(..used);
            }
            Err(_) => return,
        }
        assert!(pending.len() < 9 + MAX_FRAME_PAYLOAD);
    }
});
