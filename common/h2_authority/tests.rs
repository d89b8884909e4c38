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

    let mut update = vec![0x3f];
    update.extend(loona_hpack::encoder::encode_integer(65_536 - 31, 8));
    update.push(0x82);
    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &update));
    expect_error(&input, |e| matches!(e, AuthorityFixError::Hpack(_)));
}

#[test]
fn indexed_amplification_is_bounded() {
    // One 4,000-byte field in the dynamic table, then a block of one-byte references to it.
    let mut enc = loona_hpack::Encoder::new();
    let mut input = PREFACE.to_vec();
    let first = encode(&mut enc, &[(b"x-big", vec![b'a'; 4000])]);
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

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
/// being reset. Without the adapter the same client gets RST_STREAM.
#[tokio::test]
async fn h2_serves_socket_path_authorities_through_the_adapter() {
    for with_adapter in [true, false] {
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
            &encode(&mut enc, &request_fields("tmp%2Fsigil%2Fapi.sock")),
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
            assert_eq!(seen.as_deref(), Some(REPLACEMENT_AUTHORITY));
        } else {
            assert_eq!(answer, 0x3, "h2 alone resets the stream (RST_STREAM)");
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}
