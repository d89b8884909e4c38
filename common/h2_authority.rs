//! Any HTTP/2 `:authority` on our Unix sockets.
//!
//! gRPC clients put whatever names the socket into `:authority`: gRPC C-core (Python, C++, Ruby,
//! PHP) sends the percent-encoded path (`tmp%2Fsigil%2Fapi.sock`), grpc-java the path itself
//! (`/run/sigil/agent/public/api.sock`). On a Unix socket the value means nothing, but h2 — under
//! hyper and tonic — resets every stream whose `:authority` is not an RFC 3986 authority, so those
//! clients could not use the Workload API at all. SPIRE's agent accepts them.
//!
//! [`AuthorityFix`] sits between the socket and hyper, on the bytes the client sends. A client
//! sends the same kind of `:authority` on every request, so a connection starts in the first of
//! three modes, and its first header block decides between the other two:
//!
//! - **Decide**, until the first complete header block: frames other than HEADERS and
//!   CONTINUATION pass through as they arrive; the first header block is collected and *scanned*
//!   (its field representations walked, RFC 7541 §6, without decoding it). When the scan is sure
//!   the block has no `:authority` or only valid ones — what tonic, grpc-go, grpc-js and Envoy
//!   send — its frames go on byte for byte and the connection passes through from then on.
//!   Whatever the scan cannot judge (a reference into the dynamic table, a malformed field, an
//!   invalid `:authority`) means rewrite: a wrong guess can cost speed, not correctness.
//! - **PassThrough**: every byte goes to h2 untouched, without parsing. Nothing is changed, so
//!   h2's HPACK decoder follows the client's encoder directly, and h2 validates everything as it
//!   would without the adapter. So a client that sends a valid `:authority` first and an invalid
//!   one later on the same connection gets h2's stream reset for the later request.
//! - **Rewrite**, for the rest of the connection: every header block, the first one included, is
//!   decoded with a maintained HPACK codec (`loona-hpack`), given `localhost` in place of an
//!   `:authority` that is not a valid authority, and encoded again. HPACK is stateful in each
//!   direction, so this mode owns two contexts: a decoder that follows the client's encoder
//!   (dynamic-table size updates up to the 4,096 bytes h2 advertises), and an encoder whose table
//!   h2's decoder follows — which is why *every* header block is re-encoded, not only those that
//!   needed a change. Frames other than headers pass through untouched.
//!
//! What the server sends is never touched. Decoding with `loona-hpack` is slow (it builds a
//! Huffman table per Huffman-coded string), which is why clients that need no fix do not pay for
//! it: the scan decodes only a Huffman-coded `:authority` value, with a table-driven decoder.
//!
//! Bounds while deciding and rewriting, so that a client can cost only a fixed amount: a HEADERS
//! or CONTINUATION frame is at most h2's default `SETTINGS_MAX_FRAME_SIZE`, a header block at
//! most [`MAX_HEADER_BLOCK`] encoded bytes in at most [`MAX_CONTINUATIONS`] frames, its decoded
//! list (when rewriting) at most [`MAX_HEADER_LIST`] bytes (counted as
//! `SETTINGS_MAX_HEADER_LIST_SIZE` counts). Anything over, or a block that does not decode, or a
//! CONTINUATION out of place, ends the connection with an error (as h2 itself would, with a
//! GOAWAY). When passing through, h2's own limits apply, as without the adapter. No buffer is
//! kept while a connection is idle.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;
/// Frame header length.
const FRAME_HEADER_LEN: usize = 9;
/// Largest HEADERS/CONTINUATION payload accepted and produced: h2's default (and only ever
/// advertised) `SETTINGS_MAX_FRAME_SIZE`.
pub const MAX_FRAME_PAYLOAD: usize = 16_384;
/// Largest header block (sum of the fragments) accepted.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Most frames (HEADERS + CONTINUATIONs) one header block may take.
pub const MAX_CONTINUATIONS: usize = 64;
/// Largest decoded header list (each field's name + value + 32, as RFC 9113 §6.5.2 counts).
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// The dynamic table size h2 advertises (`SETTINGS_HEADER_TABLE_SIZE`, default): the most the
/// client's encoder may use, and what h2's decoder allows ours.
const HEADER_TABLE_SIZE: usize = 4_096;
/// What replaces an `:authority` that is not an RFC 3986 authority.
pub const REPLACEMENT_AUTHORITY: &str = "localhost";
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 4_096;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// The Huffman encoding (RFC 7541 Appendix B) of `:authority`. HPACK's Huffman code is canonical
/// and its padding fixed (the most significant bits of EOS), so a Huffman-coded name is
/// `:authority` exactly when its bytes are these.
const AUTHORITY_HUFFMAN: [u8; 8] = [0xb8, 0x3b, 0x53, 0x39, 0xec, 0x32, 0x7d, 0x7f];
/// The static table index of `:authority` (RFC 7541 Appendix A); its entry has an empty value.
const STATIC_AUTHORITY: usize = 1;
/// Entries in the static table; higher indices are in the dynamic table, which the scan does
/// not follow.
const STATIC_TABLE_LEN: usize = 61;
/// Largest HPACK integer the scan reads; a larger one is left to the full decoder.
const SCAN_MAX_INTEGER: usize = 1 << 28;
/// Longest Huffman-coded `:authority` value the scan decodes; a longer one is left to the full
/// decoder.
const SCAN_MAX_HUFFMAN_AUTHORITY: usize = 255;

/// Why the adapter ended a connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthorityFixError {
    /// A HEADERS or CONTINUATION frame over the frame size limit.
    #[error("HTTP/2 header frame of {0} bytes exceeds {MAX_FRAME_PAYLOAD}")]
    FrameTooLarge(usize),
    /// A header block over [`MAX_HEADER_BLOCK`] bytes or [`MAX_CONTINUATIONS`] frames.
    #[error("HTTP/2 header block too large ({bytes} bytes in {frames} frames)")]
    BlockTooLarge {
        /// Encoded bytes so far.
        bytes: usize,
        /// Frames so far.
        frames: usize,
    },
    /// The decoded header list is over [`MAX_HEADER_LIST`].
    #[error("HTTP/2 header list over {MAX_HEADER_LIST} bytes")]
    HeaderListTooLarge,
    /// A frame other than the expected CONTINUATION in the middle of a header block, or a
    /// CONTINUATION without one.
    #[error("HTTP/2 CONTINUATION out of sequence")]
    ContinuationOutOfSequence,
    /// Padding or priority fields longer than the frame.
    #[error("HTTP/2 HEADERS frame with invalid padding")]
    BadPadding,
    /// HEADERS on stream 0.
    #[error("HTTP/2 HEADERS frame on stream 0")]
    StreamZero,
    /// The header block does not decode.
    #[error("HPACK decoding failed: {0}")]
    Hpack(String),
}

impl From<AuthorityFixError> for io::Error {
    fn from(e: AuthorityFixError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Where the adapter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Passing through this many more bytes of the connection preface.
    Preface(usize),
    /// At a frame boundary.
    FrameStart,
    /// Passing through this many more bytes of a frame that is not ours to change.
    PassThrough(usize),
}

/// How the adapter treats a connection (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Until the first complete header block, which decides between the other two.
    Decide,
    /// Every byte passes untouched.
    PassThrough,
    /// Every header block is decoded, fixed and re-encoded.
    Rewrite,
}

/// A header block being collected from HEADERS + CONTINUATION frames.
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    /// The 5 bytes of the PRIORITY fields, when the HEADERS frame had them.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    frames: usize,
    /// The frames as they arrived, kept while deciding so that they can pass byte for byte.
    raw: Vec<u8>,
}

/// The HPACK side of the adapter, kept apart from the I/O so it can be tested on byte strings.
pub struct Rewriter {
    mode: Mode,
    state: State,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    block: Option<PendingBlock>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    /// A rewriter at the start of a connection (expecting the preface).
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            mode: Mode::Decide,
            state: State::Preface(PREFACE_LEN),
            decoder,
            encoder: loona_hpack::Encoder::new(),
            block: None,
        }
    }

    /// Whether every byte from now on passes untouched (so the caller may skip [`Self::process`]).
    pub fn passes_through(&self) -> bool {
        self.mode == Mode::PassThrough
    }

    /// Consumes what it can of `input` (from the front), appending what h2 should read to
    /// `out`. Returns how many bytes of `input` were consumed; fewer than all means the rest is
    /// an incomplete HEADERS/CONTINUATION frame (call again with more). An error ends the
    /// connection.
    pub fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, AuthorityFixError> {
        let mut at = 0;
        while at < input.len() {
            let rest = &input[at..];
            if self.mode == Mode::PassThrough {
                out.extend_from_slice(rest);
                at = input.len();
                break;
            }
            match self.state {
                State::Preface(left) | State::PassThrough(left) => {
                    let n = left.min(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    at += n;
                    self.state = match (self.state, left - n) {
                        (_, 0) => State::FrameStart,
                        (State::Preface(_), l) => State::Preface(l),
                        (_, l) => State::PassThrough(l),
                    };
                }
                State::FrameStart => {
                    let Some(header) = rest.get(..FRAME_HEADER_LEN) else {
                        break;
                    };
                    let len = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let kind = header[3];
                    let flags = header[4];
                    let stream_id =
                        u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                            & 0x7fff_ffff;
                    let ours = kind == TYPE_HEADERS || kind == TYPE_CONTINUATION;
                    if self.block.is_some() && kind != TYPE_CONTINUATION {
                        return Err(AuthorityFixError::ContinuationOutOfSequence);
                    }
                    if !ours {
                        self.state = State::PassThrough(FRAME_HEADER_LEN + len);
                        continue;
                    }
                    if len > MAX_FRAME_PAYLOAD {
                        return Err(AuthorityFixError::FrameTooLarge(len));
                    }
                    let Some(payload) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
                        break;
                    };
                    let whole = &rest[..FRAME_HEADER_LEN + len];
                    at += whole.len();
                    if kind == TYPE_HEADERS {
                        self.start_block(stream_id, flags, payload)?;
                    } else {
                        self.continue_block(stream_id, payload)?;
                    }
                    if self.mode == Mode::Decide {
                        if let Some(block) = self.block.as_mut() {
                            block.raw.extend_from_slice(whole);
                        }
                    }
                    if flags & FLAG_END_HEADERS != 0 {
                        self.finish_block(out)?;
                    }
                }
            }
        }
        Ok(at)
    }

    fn start_block(
        &mut self,
        stream_id: u32,
        flags: u8,
        payload: &[u8],
    ) -> Result<(), AuthorityFixError> {
        if stream_id == 0 {
            return Err(AuthorityFixError::StreamZero);
        }
        let mut body = payload;
        let mut pad = 0usize;
        if flags & FLAG_PADDED != 0 {
            let (&p, rest) = body.split_first().ok_or(AuthorityFixError::BadPadding)?;
            pad = usize::from(p);
            body = rest;
        }
        let priority = if flags & FLAG_PRIORITY != 0 {
            let (p, rest) = body
                .split_at_checked(5)
                .ok_or(AuthorityFixError::BadPadding)?;
            body = rest;
            let mut fields = [0u8; 5];
            fields.copy_from_slice(p);
            Some(fields)
        } else {
            None
        };
        let fragment_len = body
            .len()
            .checked_sub(pad)
            .ok_or(AuthorityFixError::BadPadding)?;
        self.block = Some(PendingBlock {
            stream_id,
            end_stream: flags & FLAG_END_STREAM != 0,
            priority,
            fragment: body[..fragment_len].to_vec(),
            frames: 1,
            raw: Vec::new(),
        });
        Ok(())
    }

    fn continue_block(&mut self, stream_id: u32, payload: &[u8]) -> Result<(), AuthorityFixError> {
        let block = self
            .block
            .as_mut()
            .filter(|b| b.stream_id == stream_id)
            .ok_or(AuthorityFixError::ContinuationOutOfSequence)?;
        block.frames += 1;
        let bytes = block.fragment.len() + payload.len();
        if bytes > MAX_HEADER_BLOCK || block.frames > MAX_CONTINUATIONS {
            return Err(AuthorityFixError::BlockTooLarge {
                bytes,
                frames: block.frames,
            });
        }
        block.fragment.extend_from_slice(payload);
        Ok(())
    }

    /// Appends the collected block to `out`: as it came when the connection passes through,
    /// else decoded, with `:authority` fixed, and re-encoded.
    fn finish_block(&mut self, out: &mut Vec<u8>) -> Result<(), AuthorityFixError> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        if self.mode == Mode::Decide {
            if scan(&block.fragment) == Decision::Pass {
                out.extend_from_slice(&block.raw);
                self.mode = Mode::PassThrough;
                return Ok(());
            }
            // The decoder starts with this first block, so it follows the client's encoder.
            self.mode = Mode::Rewrite;
        }
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut list_size = 0usize;
        let mut too_large = false;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                // Indexed fields cost the client one byte each: count before copying anything.
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if list_size > MAX_HEADER_LIST {
                    too_large = true;
                    return;
                }
                let value = if &*name == b":authority" && !valid_authority(&value) {
                    REPLACEMENT_AUTHORITY.as_bytes().to_vec()
                } else {
                    value.into_owned()
                };
                fields.push((name.into_owned(), value));
            })
            .map_err(|e| AuthorityFixError::Hpack(e.to_string()))?;
        if too_large {
            return Err(AuthorityFixError::HeaderListTooLarge);
        }
        let mut encoded = Vec::with_capacity(block.fragment.len());
        self.encoder
            .encode_into(
                fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
                &mut encoded,
            )
            .map_err(|e| AuthorityFixError::Hpack(e.to_string()))?;
        write_header_frames(&block, &encoded, out);
        Ok(())
    }
}

/// Whether h2 would take `value` as `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    !value.is_empty() && http::uri::Authority::try_from(value).is_ok()
}

/// What a connection's first header block calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Surely no `:authority`, or only valid ones: the connection can pass through.
    Pass,
    /// An invalid `:authority`, or a block the scan cannot judge.
    Rewrite,
}

/// Judges a header block without decoding it (no dynamic table; Huffman only for `:authority`
/// values). [`Decision::Pass`] only when sure; never panics, whatever the bytes.
fn scan(block: &[u8]) -> Decision {
    match scan_fields(block) {
        Some(()) => Decision::Pass,
        None => Decision::Rewrite,
    }
}

/// `Some` when every field representation in `block` (RFC 7541 §6) is surely not an invalid
/// `:authority`; `None` when unsure.
fn scan_fields(mut block: &[u8]) -> Option<()> {
    while let Some(&first) = block.first() {
        if first & 0x80 != 0 {
            // Indexed field (1xxxxxxx). Index 0 is an error, the static `:authority` has an empty
            // value, and the dynamic table is not followed.
            let (index, rest) = read_integer(block, 7)?;
            if index == 0 || index == STATIC_AUTHORITY || index > STATIC_TABLE_LEN {
                return None;
            }
            block = rest;
        } else if first & 0xe0 == 0x20 {
            // Dynamic table size update (001xxxxx): h2 checks it.
            let (_, rest) = read_integer(block, 5)?;
            block = rest;
        } else {
            // Literal field: with incremental indexing (01xxxxxx), without indexing (0000xxxx) or
            // never indexed (0001xxxx); the prefix holds the name's index, 0 for a literal name.
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            let (name_index, rest) = read_integer(block, prefix)?;
            let (is_authority, rest) = match name_index {
                0 => {
                    let (huffman, name, rest) = read_string(rest)?;
                    let is_authority = if huffman {
                        name == AUTHORITY_HUFFMAN.as_slice()
                    } else {
                        name == b":authority"
                    };
                    (is_authority, rest)
                }
                STATIC_AUTHORITY => (true, rest),
                i if i > STATIC_TABLE_LEN => return None,
                _ => (false, rest),
            };
            let (huffman, value, rest) = read_string(rest)?;
            if is_authority && !valid_encoded_authority(huffman, value) {
                return None;
            }
            block = rest;
        }
    }
    Some(())
}

/// Whether an `:authority` value as encoded in a string literal is surely valid.
fn valid_encoded_authority(huffman: bool, value: &[u8]) -> bool {
    if !huffman {
        return valid_authority(value);
    }
    if value.len() > SCAN_MAX_HUFFMAN_AUTHORITY {
        return false;
    }
    // The shortest code is 5 bits.
    let mut decoded = Vec::with_capacity(value.len() * 8 / 5);
    if httlib_huffman::decode(value, &mut decoded, httlib_huffman::DecoderSpeed::FiveBits).is_err()
    {
        return false;
    }
    // Encoding is a bijection onto valid encodings: when the decoded string encodes back to the
    // same bytes, it is what h2's decoder reads too, however lenient this decoder is (it accepts
    // some padding that h2 refuses).
    let mut again = Vec::with_capacity(value.len());
    httlib_huffman::encode(&decoded, &mut again).is_ok()
        && again == value
        && valid_authority(&decoded)
}

/// The HPACK integer (RFC 7541 §5.1) with a `prefix_bits`-bit prefix (1 to 7) at the start of
/// `bytes`, and the bytes after it; `None` when truncated or over [`SCAN_MAX_INTEGER`].
fn read_integer(bytes: &[u8], prefix_bits: u32) -> Option<(usize, &[u8])> {
    let (&first, mut rest) = bytes.split_first()?;
    let prefix_max = (1u8 << prefix_bits) - 1;
    let mut value = usize::from(first & prefix_max);
    if value < usize::from(prefix_max) {
        return Some((value, rest));
    }
    // Four continuation bytes reach 2^28; more is over the limit anyway.
    for shift in [0u32, 7, 14, 21] {
        let (&byte, tail) = rest.split_first()?;
        rest = tail;
        value += usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return (value <= SCAN_MAX_INTEGER).then_some((value, rest));
        }
    }
    None
}

/// The string literal (RFC 7541 §5.2) at the start of `bytes`: whether it is Huffman-coded, its
/// bytes as encoded, and the bytes after it; `None` when truncated or too long.
fn read_string(bytes: &[u8]) -> Option<(bool, &[u8], &[u8])> {
    let huffman = bytes.first()? & 0x80 != 0;
    let (len, rest) = read_integer(bytes, 7)?;
    let (string, rest) = rest.split_at_checked(len)?;
    Some((huffman, string, rest))
}

/// HEADERS (+ CONTINUATION) frames carrying `encoded` for `block`'s stream.
fn write_header_frames(block: &PendingBlock, encoded: &[u8], out: &mut Vec<u8>) {
    let prio_len = if block.priority.is_some() { 5 } else { 0 };
    let first_room = MAX_FRAME_PAYLOAD - prio_len;
    let (first, mut rest) = encoded.split_at(encoded.len().min(first_room));
    let mut flags = 0u8;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    frame_header(
        out,
        prio_len + first.len(),
        TYPE_HEADERS,
        flags,
        block.stream_id,
    );
    if let Some(p) = block.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        rest = tail;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), TYPE_CONTINUATION, flags, block.stream_id);
        out.extend_from_slice(chunk);
    }
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
    // len ≤ MAX_FRAME_PAYLOAD < 2^24 by construction.
    let len = len as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
}

/// An I/O stream whose incoming HTTP/2 header blocks get a valid `:authority` (see the module
/// doc). Writes pass through.
pub struct AuthorityFix<T> {
    inner: T,
    /// `None` once the connection passes through: its HPACK contexts and pending block are
    /// freed then, so a passed-through connection holds nothing of the adapter's for its life.
    rewriter: Option<Box<Rewriter>>,
    /// Bytes read from `inner` not yet processed (an incomplete header frame); empty when idle.
    input: Vec<u8>,
    /// Processed bytes not yet handed to the reader.
    output: Vec<u8>,
    output_at: usize,
}

impl<T> AuthorityFix<T> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            rewriter: Some(Box::new(Rewriter::new())),
            input: Vec::new(),
            output: Vec::new(),
            output_at: 0,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.output_at < this.output.len() {
                let n = (this.output.len() - this.output_at).min(buf.remaining());
                buf.put_slice(&this.output[this.output_at..this.output_at + n]);
                this.output_at += n;
                if this.output_at == this.output.len() {
                    // Nothing is held for an idle connection.
                    this.output = Vec::new();
                    this.output_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let rewriter = match &mut this.rewriter {
                Some(r) if !r.passes_through() => r,
                _ => {
                    // Passing through consumes all its input: nothing is held back.
                    debug_assert!(this.input.is_empty());
                    this.rewriter = None;
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
            };
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let read = rb.filled();
            if read.is_empty() {
                // End of stream: whatever was incomplete is dropped, as h2 would.
                this.input = Vec::new();
                return Poll::Ready(Ok(()));
            }
            let mut out = std::mem::take(&mut this.output);
            if this.input.is_empty() {
                let used = rewriter.process(read, &mut out)?;
                this.input.extend_from_slice(&read[used..]);
            } else {
                this.input.extend_from_slice(read);
                let used = rewriter.process(&this.input, &mut out)?;
                this.input.drain(..used);
                if this.input.is_empty() {
                    this.input = Vec::new();
                }
            }
            // The rewriter never leaves more than one incomplete header frame unprocessed.
            debug_assert!(this.input.len() < FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD);
            this.output = out;
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The connections accepted on a gRPC Unix socket, each behind an [`AuthorityFix`], for
/// tonic's `serve_with_incoming`. Accept errors are passed on as tonic expects.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = io::Result<AuthorityFix<tokio::net::UnixStream>>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|c| c.map(AuthorityFix::new))
}

#[cfg(test)]
mod tests;
