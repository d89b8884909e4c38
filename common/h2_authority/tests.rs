use super::*;

use proptest::prelude::*;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn request_fields(authority: &str) -> Vec<(&'static [u8], Vec<u8>)> {
    vec![
        (b":method", b"POST".to_vec()),
        (b":scheme", b"http".to_vec()),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec()),
        (b":authority", authority.as_bytes().to_vec()),
        (b"content-type", b"application/grpc".to_vec()),
        (b"te", b"trailers".to_vec()),
        (b"workload.spiffe.io", b"true".to_vec()),
    ]
}

fn encode(enc: &mut loona_hpack::Encoder<'static>, fields: &[(&'static [u8], Vec<u8>)]) -> Vec<u8> {
    enc.encode(fields.iter().map(|(n, v)| (*n, v.as_slice())))
}

/// Splits the adapter's output into frames: (type, flags, stream, payload).
fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    out
}

/// Runs the whole `input` through a fresh rewriter in pieces of `step` bytes, as a socket might
/// deliver it.
fn rewrite(input: &[u8], step: usize) -> Result<Vec<u8>, AuthorityFixError> {
    let mut r = Rewriter::new();
    let mut out = Vec::new();
    let mut pending = Vec::new();
    for chunk in input.chunks(step.max(1)) {
        pending.extend_from_slice(chunk);
        let used = r.process(&pending, &mut out)?;
        pending.drain(..used);
    }
    assert!(
        pending.is_empty(),
        "{} bytes left unprocessed",
        pending.len()
    );
    Ok(out)
}

/// The header blocks of the output frames, decoded with one decoder (as h2 does).
fn decoded_blocks(out: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    let after_preface = &out[PREFACE.len()..];
    let mut dec = loona_hpack::Decoder::new();
    let mut blocks = Vec::new();
    let mut block = Vec::new();
    for (kind, flags, _, payload) in frames(after_preface) {
        if kind == TYPE_HEADERS || kind == TYPE_CONTINUATION {
            let mut p = payload.as_slice();
            if kind == TYPE_HEADERS && flags & FLAG_PRIORITY != 0 {
                p = &p[5..];
            }
            block.extend_from_slice(p);
            if flags & FLAG_END_HEADERS != 0 {
                blocks.push(dec.decode(&block).expect("output decodes"));
                block.clear();
            }
        }
    }
    blocks
}

fn authority_of(block: &[(Vec<u8>, Vec<u8>)]) -> Option<String> {
    block
        .iter()
        .find(|(n, _)| n == b":authority")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

fn connection(authorities: &[&str]) -> Vec<u8> {
    let mut enc = loona_hpack::Encoder::new();
    let mut input = PREFACE.to_vec();
    input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    for (i, a) in authorities.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let block = encode(&mut enc, &request_fields(a));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, &block));
        input.extend(frame(0x0, FLAG_END_STREAM, stream, b"\0\0\0\0\0"));
    }
    input
}

#[test]
fn socket_paths_as_authority_become_localhost_and_the_rest_is_unchanged() {
    let input = connection(&[
        "tmp%2Fsigil%2Fapi.sock",
        "/run/sigil/agent/public/api.sock",
        "",
    ]);
    let out = rewrite(&input, input.len()).unwrap();
    let blocks = decoded_blocks(&out);
    assert_eq!(blocks.len(), 3);
    for b in &blocks {
        assert_eq!(authority_of(b).as_deref(), Some(REPLACEMENT_AUTHORITY));
        let names: Vec<_> = b.iter().map(|(n, _)| n.clone()).collect();
        let expected: Vec<_> = request_fields("x")
            .iter()
            .map(|(n, _)| n.to_vec())
            .collect();
        assert_eq!(names, expected, "every field, in order");
        assert!(b.contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
    }
    // Frames other than headers pass byte for byte: preface, SETTINGS, DATA.
    assert_eq!(&out[..PREFACE.len()], PREFACE);
    let f = frames(&out[PREFACE.len()..]);
    assert_eq!(f[0], (0x4, 0, 0, vec![]));
    assert_eq!(f[2], (0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0".to_vec()));
}

#[test]
fn a_valid_authority_is_kept() {
    for a in ["localhost", "example.org:443", "[::1]:8081", "unix"] {
        let out = rewrite(&connection(&[a]), 4096).unwrap();
        assert_eq!(authority_of(&decoded_blocks(&out)[0]).as_deref(), Some(a));
    }
}

#[test]
fn no_authority_stays_absent() {
    let mut enc = loona_hpack::Encoder::new();
    let fields: Vec<_> = request_fields("x")
        .into_iter()
        .filter(|(n, _)| *n != b":authority")
        .collect();
    let mut input = PREFACE.to_vec();
    input.extend(frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        1,
        &encode(&mut enc, &fields),
    ));
    let out = rewrite(&input, 7).unwrap();
    assert_eq!(authority_of(&decoded_blocks(&out)[0]), None);
    assert_eq!(
        frames(&out[PREFACE.len()..])[0].1,
        FLAG_END_HEADERS | FLAG_END_STREAM
    );
}

#[test]
fn any_split_of_the_input_gives_the_same_output() {
    let input = connection(&["tmp%2Fsigil%2Fapi.sock", "localhost", "/a/b.sock"]);
    let whole = rewrite(&input, input.len()).unwrap();
    for step in 1..40 {
        assert_eq!(rewrite(&input, step).unwrap(), whole, "step {step}");
    }
}

#[test]
fn padding_priority_and_continuations_are_understood() {
    let mut enc = loona_hpack::Encoder::new();
    let block = encode(&mut enc, &request_fields("/x.sock"));
    let (a, b) = block.split_at(block.len() / 2);
    let mut payload = vec![3u8]; // pad length
    payload.extend_from_slice(&[0x80, 0, 0, 3, 15]); // priority: exclusive, depends on 3, weight
    payload.extend_from_slice(a);
    payload.extend_from_slice(&[0, 0, 0]);
    let mut input = PREFACE.to_vec();
    input.extend(frame(
        TYPE_HEADERS,
        FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
        5,
        &payload,
    ));
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, b));
    let out = rewrite(&input, 3).unwrap();
    let f = frames(&out[PREFACE.len()..]);
    assert_eq!(f.len(), 1, "one HEADERS frame when the block fits");
    assert_eq!(f[0].1, FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS);
    assert_eq!(&f[0].3[..5], &[0x80, 0, 0, 3, 15]);
    assert_eq!(
        authority_of(&decoded_blocks(&out)[0]).as_deref(),
        Some(REPLACEMENT_AUTHORITY)
    );
}

#[test]
fn a_large_block_is_sent_on_as_headers_and_continuations() {
    let mut enc = loona_hpack::Encoder::new();
    let mut fields = request_fields("/x.sock");
    fields.push((b"x-big", vec![b'a'; 30_000]));
    let block = encode(&mut enc, &fields);
    let mut input = PREFACE.to_vec();
    let (a, rest) = block.split_at(MAX_FRAME_PAYLOAD);
    let (b, c) = rest.split_at(MAX_FRAME_PAYLOAD.min(rest.len()) / 2);
    input.extend(frame(TYPE_HEADERS, 0, 1, a));
    input.extend(frame(TYPE_CONTINUATION, 0, 1, b));
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, c));
    let out = rewrite(&input, 1000).unwrap();
    let f = frames(&out[PREFACE.len()..]);
    assert!(f.len() >= 2);
    assert!(f.iter().all(|(_, _, _, p)| p.len() <= MAX_FRAME_PAYLOAD));
    assert_eq!(f.last().unwrap().1 & FLAG_END_HEADERS, FLAG_END_HEADERS);
    let block = &decoded_blocks(&out)[0];
    assert!(block.contains(&(b"x-big".to_vec(), vec![b'a'; 30_000])));
}

fn expect_error(input: &[u8], what: fn(&AuthorityFixError) -> bool) {
    let err = rewrite(input, 1 << 20).expect_err("the connection must end");
    assert!(what(&err), "unexpected error {err:?}");
}

#[test]
fn continuation_floods_end_the_connection() {
    let mut enc = loona_hpack::Encoder::new();
    let block = encode(&mut enc, &request_fields("/x.sock"));
    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, 0, 1, &block[..1]));
    for _ in 0..MAX_CONTINUATIONS + 1 {
        input.extend(frame(TYPE_CONTINUATION, 0, 1, &[]));
    }
    expect_error(&input, |e| {
        matches!(e, AuthorityFixError::BlockTooLarge { .. })
    });

    // Full-size CONTINUATIONs: bytes run out before frames do.
    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, 0, 1, &vec![0u8; MAX_FRAME_PAYLOAD]));
    for _ in 0..8 {
        input.extend(frame(
            TYPE_CONTINUATION,
            0,
            1,
            &vec![0u8; MAX_FRAME_PAYLOAD],
        ));
    }
    expect_error(&input, |e| {
        matches!(e, AuthorityFixError::BlockTooLarge { .. })
    });
}

#[test]
fn frames_out_of_sequence_end_the_connection() {
    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82]));
    expect_error(&input, |e| {
        *e == AuthorityFixError::ContinuationOutOfSequence
    });

    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, 0, 1, &[0x82]));
    input.extend(frame(0x0, 0, 1, b"data"));
    expect_error(&input, |e| {
        *e == AuthorityFixError::ContinuationOutOfSequence
    });

    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, 0, 1, &[0x82]));
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[0x84]));
    expect_error(&input, |e| {
        *e == AuthorityFixError::ContinuationOutOfSequence
    });

    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 0, &[0x82]));
    expect_error(&input, |e| *e == AuthorityFixError::StreamZero);
}

#[test]
fn bad_padding_and_oversized_frames_end_the_connection() {
    let mut input = PREFACE.to_vec();
    input.extend(frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS | FLAG_PADDED,
        1,
        &[200, 0x82],
    ));
    expect_error(&input, |e| *e == AuthorityFixError::BadPadding);

    let mut input = PREFACE.to_vec();
    input.extend(frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS | FLAG_PRIORITY,
        1,
        &[0, 0],
    ));
    expect_error(&input, |e| *e == AuthorityFixError::BadPadding);

    // Only the frame header is needed to refuse it: nothing is buffered.
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(&[0xff, 0xff, 0xff, TYPE_HEADERS, 0, 0, 0, 0, 1]);
    expect_error(&input, |e| {
        *e == AuthorityFixError::FrameTooLarge(0xff_ffff)
    });
}

#[test]
fn dynamic_table_size_updates_beyond_the_advertised_size_end_the_connection() {
    // Size update to 4,096 (allowed), then to 65,536 (over what h2 advertises).
    let ok = [0x3f, 0xe1, 0x1f, 0x82];
    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &ok));
    rewrite(&input, 5).unwrap();

    // With an `:authority` to fix, the block is decoded, and the update refused.
    let mut update = vec![0x3f];
    update.extend(loona_hpack::encoder::encode_integer(65_536 - 31, 8));
    update.extend(literal(Name::Index(1), b"/x.sock", false));
    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &update));
    expect_error(&input, |e| matches!(e, AuthorityFixError::Hpack(_)));

    // Without, the block passes untouched and h2 refuses the update itself.
    let mut update = vec![0x3f];
    update.extend(loona_hpack::encoder::encode_integer(65_536 - 31, 8));
    update.push(0x82);
    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &update));
    assert_eq!(rewrite(&input, 5).unwrap(), input);
}

#[test]
fn indexed_amplification_is_bounded() {
    // One 4,000-byte field in the dynamic table, then a block of one-byte references to it, on
    // a connection that is rewritten (a socket path as `:authority`).
    let mut enc = loona_hpack::Encoder::new();
    let mut input = PREFACE.to_vec();
    let first = encode(
        &mut enc,
        &[
            (b":authority", b"/x.sock".to_vec()),
            (b"x-big", vec![b'a'; 4000]),
        ],
    );
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &first));
    let refs = vec![0x80 | 62; 10_000];
    let (a, rest) = refs.split_at(MAX_FRAME_PAYLOAD.min(refs.len()));
    input.extend(frame(
        TYPE_HEADERS,
        if rest.is_empty() { FLAG_END_HEADERS } else { 0 },
        3,
        a,
    ));
    if !rest.is_empty() {
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, rest));
    }
    expect_error(&input, |e| *e == AuthorityFixError::HeaderListTooLarge);
}

#[test]
fn garbage_hpack_ends_the_connection() {
    let mut input = PREFACE.to_vec();
    // Index 0 does not exist; then an index far out of the table; then a truncated literal.
    for block in [&[0x80u8][..], &[0xff, 0xff, 0x7f], &[0x40, 0x85, b'a']] {
        let mut i = input.clone();
        i.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, block));
        expect_error(&i, |e| matches!(e, AuthorityFixError::Hpack(_)));
    }
    input.clear();
}

/// An HPACK integer (RFC 7541 §5.1): `flags` above a `prefix`-bit prefix.
fn int(flags: u8, prefix: u32, value: usize) -> Vec<u8> {
    let max = (1usize << prefix) - 1;
    if value < max {
        return vec![flags | value as u8];
    }
    let mut out = vec![flags | max as u8];
    let mut rest = value - max;
    while rest >= 128 {
        out.push(0x80 | (rest % 128) as u8);
        rest /= 128;
    }
    out.push(rest as u8);
    out
}

fn huffman(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    httlib_huffman::encode(s, &mut out).unwrap();
    out
}

/// A string literal (RFC 7541 §5.2), Huffman-coded or raw.
fn string(s: &[u8], huffman_coded: bool) -> Vec<u8> {
    let bytes = if huffman_coded {
        huffman(s)
    } else {
        s.to_vec()
    };
    let mut out = int(if huffman_coded { 0x80 } else { 0 }, 7, bytes.len());
    out.extend(bytes);
    out
}

/// How a literal field names its header.
#[derive(Debug, Clone)]
enum Name {
    /// By table index.
    Index(usize),
    /// As a string literal (raw or Huffman-coded).
    Literal(Vec<u8>, bool),
}

/// A literal field without indexing, so that the dynamic table stays as it was.
fn literal(name: Name, value: &[u8], huffman_coded: bool) -> Vec<u8> {
    let mut out = match name {
        Name::Index(i) => int(0, 4, i),
        Name::Literal(n, h) => {
            let mut out = vec![0];
            out.extend(string(&n, h));
            out
        }
    };
    out.extend(string(value, huffman_coded));
    out
}

/// A request block as a client with its own HPACK encoder might send it (static indices,
/// Huffman-coded strings, nothing added to the dynamic table), with `authority` (an encoded
/// field) after `:path`.
fn request_block(authority: Option<Vec<u8>>) -> Vec<u8> {
    let mut out = vec![0x83, 0x86]; // :method POST, :scheme http
    out.extend(literal(
        Name::Index(4),
        b"/SpiffeWorkloadAPI/FetchX509SVID",
        true,
    ));
    out.extend(authority.unwrap_or_default());
    out.extend(literal(Name::Index(31), b"application/grpc", true));
    out.extend(literal(
        Name::Literal(b"te".to_vec(), false),
        b"trailers",
        true,
    ));
    out.extend(literal(
        Name::Literal(b"workload.spiffe.io".to_vec(), true),
        b"true",
        false,
    ));
    out
}

/// A connection whose first request carries `first_block`, followed by requests with the
/// `later` authorities encoded by loona (in step: the first block leaves the dynamic table
/// empty).
fn hand_connection(first_block: &[u8], later: &[&str]) -> Vec<u8> {
    let mut input = PREFACE.to_vec();
    input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, first_block));
    input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0"));
    let mut enc = loona_hpack::Encoder::new();
    for (i, a) in later.iter().enumerate() {
        let stream = 3 + 2 * i as u32;
        let block = encode(&mut enc, &request_fields(a));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, &block));
        input.extend(frame(0x0, FLAG_END_STREAM, stream, b"\0\0\0\0\0"));
    }
    input
}

const C_CORE: &str = "tmp%2Fsigil%2Fapi.sock";
const GRPC_JAVA: &str = "/run/sigil/agent/public/api.sock";

#[test]
fn the_huffman_constant_is_authority() {
    let decoded = loona_hpack::huffman::HuffmanDecoder::new()
        .decode(&AUTHORITY_HUFFMAN)
        .unwrap();
    assert_eq!(decoded, b":authority");
    assert_eq!(huffman(b":authority"), AUTHORITY_HUFFMAN);
}

#[test]
fn a_valid_or_absent_authority_passes_byte_for_byte() {
    let firsts = [
        Some(literal(Name::Index(1), b"localhost", true)),
        Some(literal(Name::Index(1), b"[::]:50051", true)),
        Some(literal(Name::Index(1), b"localhost", false)),
        Some(literal(
            Name::Literal(b":authority".to_vec(), true),
            b"unix",
            true,
        )),
        None,
    ];
    for first in firsts {
        let block = request_block(first.clone());
        assert_eq!(scan(&block), Decision::Pass, "{first:?}");
        // Later blocks pass untouched too, even one whose `:authority` h2 will refuse.
        let input = hand_connection(&block, &["localhost", C_CORE]);
        for step in [1, 7, 100, input.len()] {
            assert_eq!(
                rewrite(&input, step).unwrap(),
                input,
                "{first:?} step {step}"
            );
        }
    }

    // From a loona-encoded client as well (incremental indexing, raw strings).
    let input = connection(&["[::1]:8081", GRPC_JAVA]);
    let out = rewrite(&input, 13).unwrap();
    assert_eq!(out, input);
    let blocks = decoded_blocks(&out);
    assert_eq!(authority_of(&blocks[1]).as_deref(), Some(GRPC_JAVA));

    // Padding, priority and CONTINUATIONs are kept as they came.
    let block = request_block(Some(literal(Name::Index(1), b"localhost", true)));
    let (a, b) = block.split_at(block.len() / 2);
    let mut payload = vec![3u8];
    payload.extend_from_slice(&[0x80, 0, 0, 3, 15]);
    payload.extend_from_slice(a);
    payload.extend_from_slice(&[0, 0, 0]);
    let mut input = PREFACE.to_vec();
    input.extend(frame(
        TYPE_HEADERS,
        FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
        5,
        &payload,
    ));
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, b));
    assert_eq!(rewrite(&input, 3).unwrap(), input);
}

#[test]
fn socket_path_authorities_raw_or_huffman_are_rewritten_on_the_whole_connection() {
    for path in [C_CORE, GRPC_JAVA] {
        for huffman_coded in [false, true] {
            let block = request_block(Some(literal(
                Name::Index(1),
                path.as_bytes(),
                huffman_coded,
            )));
            assert_eq!(scan(&block), Decision::Rewrite);
            let input = hand_connection(&block, &[GRPC_JAVA, "localhost:1"]);
            let out = rewrite(&input, 5).unwrap();
            assert_eq!(out, rewrite(&input, input.len()).unwrap());
            let blocks = decoded_blocks(&out);
            let authorities: Vec<_> = blocks.iter().map(|b| authority_of(b)).collect();
            assert_eq!(
                authorities,
                [
                    Some(REPLACEMENT_AUTHORITY.to_string()),
                    Some(REPLACEMENT_AUTHORITY.to_string()),
                    Some("localhost:1".to_string()),
                ],
                "{path} huffman {huffman_coded}"
            );
            assert_eq!(blocks[0][2].0, b":path");
            assert_eq!(blocks[0][2].1, b"/SpiffeWorkloadAPI/FetchX509SVID");
            assert!(blocks[0].contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
            assert!(blocks[0].contains(&(b"te".to_vec(), b"trailers".to_vec())));
        }
    }
}

#[test]
fn how_the_first_block_names_authority_decides() {
    use Decision::{Pass, Rewrite};
    let authority_name = |h| Name::Literal(b":authority".to_vec(), h);
    // Huffman-coded "localhost:1" with its padding (the EOS prefix, all ones) made zeros.
    let mut bad_padding = huffman(b"localhost:1");
    let pad_bits = 8 - b"localhost:1"
        .iter()
        .map(|&c| u32::from(httlib_huffman::encoder::table::ENCODE_TABLE[usize::from(c)].0))
        .sum::<u32>()
        % 8;
    assert!(pad_bits > 0 && pad_bits < 8);
    *bad_padding.last_mut().unwrap() &= !((1u8 << pad_bits) - 1);
    let mut bad_padding_field = int(0, 4, 1);
    bad_padding_field.extend(int(0x80, 7, bad_padding.len()));
    bad_padding_field.extend(&bad_padding);

    let mut dynamic = vec![0x41];
    dynamic.extend(string(b"localhost", false));
    dynamic.push(0x80 | 62);

    let cases: Vec<(&str, Vec<u8>, Decision)> = vec![
        (
            "Huffman name, Huffman socket path",
            literal(authority_name(true), C_CORE.as_bytes(), true),
            Rewrite,
        ),
        (
            "Huffman name, valid value",
            literal(authority_name(true), b"localhost", true),
            Pass,
        ),
        (
            "raw name, socket path",
            literal(authority_name(false), GRPC_JAVA.as_bytes(), false),
            Rewrite,
        ),
        (
            "raw name, valid value",
            literal(authority_name(false), b"[::]:50051", false),
            Pass,
        ),
        (
            "another Huffman name",
            literal(Name::Literal(b":authorit".to_vec(), true), b"/x", true),
            Pass,
        ),
        (
            "another raw name",
            literal(Name::Literal(b"x-authority".to_vec(), false), b"/x", false),
            Pass,
        ),
        ("static :authority, empty", vec![0x81], Rewrite),
        ("dynamic entry", dynamic, Rewrite),
        (
            "dynamic name",
            literal(Name::Index(62), b"localhost", false),
            Rewrite,
        ),
        (
            "never indexed, socket path",
            {
                let mut f = literal(Name::Index(1), b"/x", false);
                f[0] |= 0x10;
                f
            },
            Rewrite,
        ),
        (
            "never indexed, valid",
            {
                let mut f = literal(Name::Index(1), b"unix", false);
                f[0] |= 0x10;
                f
            },
            Pass,
        ),
        (
            "incremental indexing, valid",
            {
                let mut f = vec![0x41];
                f.extend(string(b"localhost", true));
                f
            },
            Pass,
        ),
        ("empty value", literal(Name::Index(1), b"", false), Rewrite),
        (
            "Huffman value with zero padding",
            bad_padding_field,
            Rewrite,
        ),
        (
            "Huffman value of EOS",
            {
                let mut f = int(0, 4, 1);
                f.extend([0x84, 0xff, 0xff, 0xff, 0xff]);
                f
            },
            Rewrite,
        ),
        (
            "long valid Huffman value",
            literal(Name::Index(1), &[b'a'; 450], true),
            Rewrite,
        ),
        ("size update", vec![0x3f, 0xe1, 0x1f], Pass),
        ("truncated value", vec![0x01, 0x85, b'l'], Rewrite),
        ("truncated integer", vec![0x7f, 0xff], Rewrite),
        (
            "huge integer",
            vec![0x7f, 0xff, 0xff, 0xff, 0xff, 0x0f],
            Rewrite,
        ),
        ("index 0", vec![0x80], Rewrite),
    ];
    for (what, field, decision) in cases {
        // Last, so that a truncated field is truncated.
        let block = [request_block(None), field].concat();
        assert_eq!(scan(&block), decision, "{what}");
        let input = hand_connection(&block, &["localhost"]);
        match rewrite(&input, 9) {
            Ok(out) if decision == Pass => assert_eq!(out, input, "{what}"),
            Ok(out) => {
                assert_ne!(out, input, "{what}: rewritten");
                for block in decoded_blocks(&out) {
                    if let Some(a) = authority_of(&block) {
                        assert!(valid_authority(a.as_bytes()), "{what}: {a}");
                    }
                }
            }
            // Blocks that do not decode end the connection, as h2 would.
            Err(e) => assert!(
                decision == Rewrite && matches!(e, AuthorityFixError::Hpack(_)),
                "{what}: {e:?}"
            ),
        }
    }
}

#[test]
fn any_split_gives_the_same_output_when_passing_through() {
    let input = connection(&["localhost", C_CORE, "/a/b.sock"]);
    for step in 1..40 {
        assert_eq!(rewrite(&input, step).unwrap(), input, "step {step}");
    }
}

/// One encoded field of a first block, valid or not, for the scan's properties.
fn any_field() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        proptest::sample::select(vec![
            "localhost",
            "[::]:50051",
            "example.org:443",
            C_CORE,
            GRPC_JAVA,
            "",
            "a b",
            "[::1",
            "x@y:1",
            "h:99999",
        ])
        .prop_map(|v| v.as_bytes().to_vec()),
        "[ -~]{0,20}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..12),
    ];
    let name = prop_oneof![
        (0usize..70).prop_map(Name::Index),
        any::<bool>().prop_map(|h| Name::Literal(b":authority".to_vec(), h)),
        ("[a-z:]{0,12}", any::<bool>()).prop_map(|(n, h)| Name::Literal(n.into_bytes(), h)),
    ];
    prop_oneof![
        (0usize..70).prop_map(|i| int(0x80, 7, i)),
        (0usize..5000).prop_map(|v| int(0x20, 5, v)),
        (
            proptest::sample::select(vec![(0x40u8, 6u32), (0x00, 4), (0x10, 4)]),
            name,
            value.clone(),
            any::<bool>(),
        )
            .prop_map(|((flags, prefix), name, value, h)| {
                let mut out = match name {
                    Name::Index(i) => int(flags, prefix, i),
                    Name::Literal(n, nh) => {
                        let mut out = vec![flags];
                        out.extend(string(&n, nh));
                        out
                    }
                };
                out.extend(string(&value, h));
                out
            }),
        // Arbitrary bytes presented as a Huffman-coded `:authority`.
        (value, any::<bool>()).prop_map(|(v, h)| {
            let mut out = int(if h { 0x40 } else { 0 }, if h { 6 } else { 4 }, 1);
            out.extend(int(0x80, 7, v.len()));
            out.extend(v);
            out
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The scan never panics, and passes a block only when every `:authority` in it (as a full
    /// decoder reads it, when the block decodes) is valid.
    #[test]
    fn scan_passes_only_valid_authorities(
        fields in proptest::collection::vec(any_field(), 0..8),
        cut in any::<proptest::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut block = fields.concat();
        if truncate && !block.is_empty() {
            block.truncate(cut.index(block.len()));
        }
        if scan(&block) == Decision::Pass {
            let mut dec = loona_hpack::Decoder::new();
            dec.set_max_allowed_table_size(HEADER_TABLE_SIZE);
            if let Ok(list) = dec.decode(&block) {
                for (n, v) in list {
                    if n == b":authority" {
                        prop_assert!(valid_authority(&v), "{:?} passed", String::from_utf8_lossy(&v));
                    }
                }
            }
        }
    }

    /// Arbitrary bytes: the scan never panics.
    #[test]
    fn scan_never_panics(block in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = scan(&block);
        let _ = valid_encoded_authority(true, &block);
    }

    /// Arbitrary bytes after the preface: an error or an output, never a panic, and never more
    /// held back than one header frame.
    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..4096), step in 1usize..64) {
        let mut input = PREFACE.to_vec();
        input.extend(body);
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        let mut pending = Vec::new();
        for chunk in input.chunks(step) {
            pending.extend_from_slice(chunk);
            match r.process(&pending, &mut out) {
                Ok(used) => { pending.drain(..used); }
                Err(_) => break,
            }
            prop_assert!(pending.len() < FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD);
        }
    }

    /// Well-formed frames of every type with arbitrary payloads and flags: same.
    #[test]
    fn arbitrary_frames_never_panic(
        frames_in in proptest::collection::vec(
            (0u8..12, any::<u8>(), 0u32..8, proptest::collection::vec(any::<u8>(), 0..300)),
            0..24,
        ),
    ) {
        let mut input = PREFACE.to_vec();
        for (kind, flags, stream, payload) in &frames_in {
            input.extend(frame(*kind, *flags, *stream, payload));
        }
        let _ = rewrite(&input, 17);
    }

    /// Any header values (with arbitrary authorities) survive the round trip, with the
    /// authority valid afterwards.
    #[test]
    fn header_values_survive(
        authority in "[ -~]{0,40}",
        values in proptest::collection::vec("[ -~]{0,60}", 0..6),
    ) {
        let mut enc = loona_hpack::Encoder::new();
        let mut fields = request_fields(&authority);
        let names: [&'static [u8]; 6] = [b"x-a", b"x-b", b"x-c", b"x-d", b"x-e", b"x-f"];
        for (n, v) in names.iter().zip(&values) {
            fields.push((n, v.as_bytes().to_vec()));
        }
        let mut input = PREFACE.to_vec();
        for stream in [1u32, 3] {
            input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, &encode(&mut enc, &fields)));
        }
        let out = rewrite(&input, 11).unwrap();
        for block in decoded_blocks(&out) {
            let a = authority_of(&block).unwrap();
            prop_assert!(valid_authority(a.as_bytes()));
            if valid_authority(authority.as_bytes()) {
                prop_assert_eq!(&a, &authority);
            }
            for (n, v) in names.iter().zip(&values) {
                prop_assert!(block.contains(&(n.to_vec(), v.as_bytes().to_vec())));
            }
        }
    }
}

/// A real h2 server (what hyper and tonic run) behind the adapter, on a real Unix socket, with a
/// client sending gRPC C-core's `:authority`: the request arrives (with `localhost`) instead of
/// being reset. Without the adapter the same client gets RST_STREAM. A valid `:authority` goes
/// through the adapter as it was (the connection passes through).
#[tokio::test]
async fn h2_serves_socket_path_authorities_through_the_adapter() {
    for (with_adapter, authority) in [(true, C_CORE), (false, C_CORE), (true, "[::]:50051")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let io: Box<dyn AsyncReadWrite> = if with_adapter {
                Box::new(AuthorityFix::new(sock))
            } else {
                Box::new(sock)
            };
            let mut conn = h2::server::handshake(io).await.unwrap();
            let mut seen = None;
            if let Some(Ok((req, mut respond))) = conn.accept().await {
                seen = req.uri().authority().map(|a| a.to_string());
                let resp = http::Response::builder().status(200).body(()).unwrap();
                let _ = respond.send_response(resp, true);
            }
            // Let the connection flush what it has.
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(200), conn.accept()).await;
            seen
        });

        let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut enc = loona_hpack::Encoder::new();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[]));
        bytes.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &encode(&mut enc, &request_fields(authority)),
        ));
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client.write_all(&bytes).await.unwrap();
        // Read frames until the answer to stream 1: HEADERS (served) or RST_STREAM (refused).
        let mut buf = Vec::new();
        let answer = loop {
            let mut chunk = [0u8; 4096];
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(10), client.read(&mut chunk))
                    .await
                    .unwrap()
                    .unwrap();
            assert!(n > 0, "connection closed without an answer");
            buf.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            let mut found = None;
            while buf.len() >= at + 9 {
                let len = usize::from(buf[at]) << 16
                    | usize::from(buf[at + 1]) << 8
                    | usize::from(buf[at + 2]);
                if buf.len() < at + 9 + len {
                    break;
                }
                let stream =
                    u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]);
                if stream == 1 && (buf[at + 3] == TYPE_HEADERS || buf[at + 3] == 0x3) {
                    found = Some(buf[at + 3]);
                }
                at += 9 + len;
            }
            if let Some(f) = found {
                break f;
            }
        };
        drop(client);
        let seen = server.await.unwrap();
        if with_adapter {
            assert_eq!(answer, TYPE_HEADERS, "served");
            let expected = if authority == C_CORE {
                REPLACEMENT_AUTHORITY
            } else {
                authority
            };
            assert_eq!(seen.as_deref(), Some(expected));
        } else {
            assert_eq!(answer, 0x3, "h2 alone resets the stream (RST_STREAM)");
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}
