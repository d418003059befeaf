//! The multiplexer's frames, as they travel inside the tunnel's binary WebSocket messages.
//!
//! Every frame starts with the same 9 bytes: the stream id (`u32`), the kind (`u8`, its top
//! bit [`END`] meaning "this side's body ends with this frame") and the payload length
//! (`u32`), all big-endian. A message holds one or more whole frames.
//!
//! | kind | payload |
//! |---|---|
//! | request head | method (`u16` length + bytes), path and query (`u16` length + bytes), header block |
//! | response head | status (`u16`), header block |
//! | data | body bytes, at most [`MAX_DATA`] |
//! | reset | one byte: the [`Reason`] |
//! | window | `u32`: how many more body bytes the peer may send on the stream |
//!
//! A header block is a `u16` count, then per header a `u16` name length, the name, a `u16`
//! value length and the value. Everything read is checked: lengths against what the message
//! holds and the limits below, methods, paths, names and values against `http`'s rules.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri};

use crate::MAX_HEADER_LIST_BYTES;

/// Bytes before every frame's payload.
pub const HEADER_LEN: usize = 9;
/// Largest data payload one frame carries: 16 KiB, so a full frame fits one WebSocket message
/// of [`MAX_WS_MESSAGE_OUT`](crate::MAX_WS_MESSAGE_OUT).
pub const MAX_DATA: usize = 16 * 1024;
/// The kind's flag bit: this side's body ends with this frame.
pub const END: u8 = 0x80;

const REQUEST: u8 = 1;
const RESPONSE: u8 = 2;
const DATA: u8 = 3;
const RESET: u8 = 4;
const WINDOW: u8 = 5;

/// Why a stream was reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The side that reset no longer wants the stream (its caller went away).
    Cancel,
    /// The server takes no new streams (it is draining, or at its limit): the request did not
    /// start and may be sent again.
    Refused,
    /// The side that reset failed to produce its body.
    Internal,
}

impl Reason {
    fn code(self) -> u8 {
        match self {
            Reason::Cancel => 0,
            Reason::Refused => 1,
            Reason::Internal => 2,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            1 => Reason::Refused,
            2 => Reason::Internal,
            // Unknown codes (a newer peer's) mean the stream is over all the same.
            _ => Reason::Cancel,
        }
    }
}

/// A request's head as it crosses the tunnel.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

/// A response's head as it crosses the tunnel.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// One frame read from a message.
#[derive(Debug)]
pub enum Frame {
    Request {
        id: u32,
        head: RequestHead,
        end: bool,
    },
    Response {
        id: u32,
        head: ResponseHead,
        end: bool,
    },
    Data {
        id: u32,
        data: Bytes,
        end: bool,
    },
    Reset {
        id: u32,
        reason: Reason,
    },
    Window {
        id: u32,
        increment: u32,
    },
}

/// A message the peer should never have sent; the tunnel ends with it.
#[derive(Debug, thiserror::Error)]
#[error("tunnel protocol error: {0}")]
pub struct ProtocolError(pub &'static str);

/// Encoded length of `headers` as a header block, or `None` if a name or value is longer than
/// a `u16` can say.
fn header_block_len(headers: &HeaderMap) -> Option<usize> {
    let mut len = 2;
    for (name, value) in headers {
        if name.as_str().len() > usize::from(u16::MAX) || value.len() > usize::from(u16::MAX) {
            return None;
        }
        len += 4 + name.as_str().len() + value.len();
    }
    Some(len)
}

fn put_header(out: &mut BytesMut, id: u32, kind: u8, end: bool, len: usize) {
    out.put_u32(id);
    out.put_u8(if end { kind | END } else { kind });
    out.put_u32(len as u32);
}

fn put_header_block(out: &mut BytesMut, headers: &HeaderMap) {
    out.put_u16(headers.len() as u16);
    for (name, value) in headers {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u16(value.len() as u16);
        out.put_slice(value.as_bytes());
    }
}

/// Appends a request head. `Err` if it is too large to send (the caller answers 431).
pub fn put_request(
    out: &mut BytesMut,
    id: u32,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    end: bool,
) -> Result<(), ProtocolError> {
    let too_large = ProtocolError("request head too large");
    let block = header_block_len(headers).ok_or(ProtocolError("request head too large"))?;
    let method = method.as_str().as_bytes();
    if method.len() > usize::from(u16::MAX) || path.len() > usize::from(u16::MAX) {
        return Err(too_large);
    }
    let len = 2 + method.len() + 2 + path.len() + block;
    if len > MAX_HEADER_LIST_BYTES as usize || headers.len() > usize::from(u16::MAX) {
        return Err(too_large);
    }
    out.reserve(HEADER_LEN + len);
    put_header(out, id, REQUEST, end, len);
    out.put_u16(method.len() as u16);
    out.put_slice(method);
    out.put_u16(path.len() as u16);
    out.put_slice(path.as_bytes());
    put_header_block(out, headers);
    Ok(())
}

/// Appends a response head. `Err` if it is too large to send.
pub fn put_response(
    out: &mut BytesMut,
    id: u32,
    status: StatusCode,
    headers: &HeaderMap,
    end: bool,
) -> Result<(), ProtocolError> {
    let block = header_block_len(headers).ok_or(ProtocolError("response head too large"))?;
    let len = 2 + block;
    if len > MAX_HEADER_LIST_BYTES as usize || headers.len() > usize::from(u16::MAX) {
        return Err(ProtocolError("response head too large"));
    }
    out.reserve(HEADER_LEN + len);
    put_header(out, id, RESPONSE, end, len);
    out.put_u16(status.as_u16());
    put_header_block(out, headers);
    Ok(())
}

/// Appends a data frame (`data` at most [`MAX_DATA`] bytes; empty with `end` ends the body).
pub fn put_data(out: &mut BytesMut, id: u32, data: &[u8], end: bool) {
    debug_assert!(data.len() <= MAX_DATA);
    out.reserve(HEADER_LEN + data.len());
    put_header(out, id, DATA, end, data.len());
    out.put_slice(data);
}

/// Appends a reset.
pub fn put_reset(out: &mut BytesMut, id: u32, reason: Reason) {
    put_header(out, id, RESET, false, 1);
    out.put_u8(reason.code());
}

/// Appends a window increment.
pub fn put_window(out: &mut BytesMut, id: u32, increment: u32) {
    put_header(out, id, WINDOW, false, 4);
    out.put_u32(increment);
}

/// The frames of one message, in order.
pub struct Frames {
    rest: Bytes,
}

impl Frames {
    pub fn new(message: Bytes) -> Self {
        Frames { rest: message }
    }
}

impl Iterator for Frames {
    type Item = Result<Frame, ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let frame = read_frame(&mut self.rest);
        if frame.is_err() {
            // Nothing after a broken frame can be trusted.
            self.rest.clear();
        }
        Some(frame)
    }
}

fn read_frame(rest: &mut Bytes) -> Result<Frame, ProtocolError> {
    if rest.len() < HEADER_LEN {
        return Err(ProtocolError("truncated frame header"));
    }
    let id = rest.get_u32();
    let kind = rest.get_u8();
    let len = rest.get_u32() as usize;
    if len > rest.len() {
        return Err(ProtocolError("frame longer than its message"));
    }
    let end = kind & END != 0;
    let mut payload = rest.split_to(len);
    match kind & !END {
        REQUEST => {
            check_head_len(len)?;
            let head = read_request(&mut payload)?;
            Ok(Frame::Request { id, head, end })
        }
        RESPONSE => {
            check_head_len(len)?;
            let head = read_response(&mut payload)?;
            Ok(Frame::Response { id, head, end })
        }
        DATA if len <= MAX_DATA => Ok(Frame::Data {
            id,
            data: payload,
            end,
        }),
        DATA => Err(ProtocolError("data frame over 16 KiB")),
        RESET if len == 1 && !end => Ok(Frame::Reset {
            id,
            reason: Reason::from_code(payload.get_u8()),
        }),
        WINDOW if len == 4 && !end => {
            let increment = payload.get_u32();
            if increment == 0 || increment > i32::MAX as u32 {
                return Err(ProtocolError("window increment out of range"));
            }
            Ok(Frame::Window { id, increment })
        }
        RESET | WINDOW => Err(ProtocolError("malformed reset or window frame")),
        _ => Err(ProtocolError("unknown frame kind")),
    }
}

fn check_head_len(len: usize) -> Result<(), ProtocolError> {
    if len > MAX_HEADER_LIST_BYTES as usize {
        return Err(ProtocolError("head over the header size limit"));
    }
    Ok(())
}

/// `n` bytes off the front of `payload`, if it has them.
fn take(payload: &mut Bytes, n: usize) -> Result<Bytes, ProtocolError> {
    if payload.len() < n {
        return Err(ProtocolError("truncated head"));
    }
    Ok(payload.split_to(n))
}

fn get_u16(payload: &mut Bytes) -> Result<u16, ProtocolError> {
    let bytes = take(payload, 2)?;
    Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn read_request(payload: &mut Bytes) -> Result<RequestHead, ProtocolError> {
    let method_len = usize::from(get_u16(payload)?);
    let method = Method::from_bytes(&take(payload, method_len)?)
        .map_err(|_| ProtocolError("malformed method"))?;
    let path_len = usize::from(get_u16(payload)?);
    let path = take(payload, path_len)?;
    if !path.starts_with(b"/") {
        return Err(ProtocolError("request path must start with /"));
    }
    let uri = Uri::from_maybe_shared(path).map_err(|_| ProtocolError("malformed request path"))?;
    let headers = read_header_block(payload)?;
    Ok(RequestHead {
        method,
        uri,
        headers,
    })
}

fn read_response(payload: &mut Bytes) -> Result<ResponseHead, ProtocolError> {
    let status =
        StatusCode::from_u16(get_u16(payload)?).map_err(|_| ProtocolError("malformed status"))?;
    let headers = read_header_block(payload)?;
    Ok(ResponseHead { status, headers })
}

fn read_header_block(payload: &mut Bytes) -> Result<HeaderMap, ProtocolError> {
    let count = usize::from(get_u16(payload)?);
    // Every header takes at least 4 bytes: a count the payload cannot hold is a lie, and must
    // not size an allocation.
    if count * 4 > payload.len() {
        return Err(ProtocolError("header count beyond the head"));
    }
    let mut headers = HeaderMap::with_capacity(count);
    for _ in 0..count {
        let name_len = usize::from(get_u16(payload)?);
        let name = HeaderName::from_bytes(&take(payload, name_len)?)
            .map_err(|_| ProtocolError("malformed header name"))?;
        let value_len = usize::from(get_u16(payload)?);
        let value = HeaderValue::from_maybe_shared(take(payload, value_len)?)
            .map_err(|_| ProtocolError("malformed header value"))?;
        headers.append(name, value);
    }
    if !payload.is_empty() {
        return Err(ProtocolError("bytes after the header block"));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(message: BytesMut) -> Result<Frame, ProtocolError> {
        let mut frames = Frames::new(message.freeze());
        let frame = frames.next().expect("a frame");
        assert!(frames.next().is_none(), "one frame only");
        frame
    }

    #[test]
    fn every_kind_of_frame_reads_back_as_written() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-many", HeaderValue::from_static("1"));
        headers.append("x-many", HeaderValue::from_static("2"));
        let mut out = BytesMut::new();
        put_request(&mut out, 7, &Method::POST, "/api/chat?x=1", &headers, false).unwrap();
        put_response(&mut out, 7, StatusCode::CREATED, &headers, true).unwrap();
        put_data(&mut out, 7, b"hello", true);
        put_reset(&mut out, 9, Reason::Refused);
        put_window(&mut out, 9, 65_536);
        let frames: Vec<Frame> = Frames::new(out.freeze()).map(Result::unwrap).collect();
        let [req, res, data, reset, window] = frames.try_into().unwrap();
        let Frame::Request {
            id: 7,
            head,
            end: false,
        } = req
        else {
            panic!("{req:?}")
        };
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri, "/api/chat?x=1");
        assert_eq!(head.headers, headers);
        let Frame::Response {
            id: 7,
            head,
            end: true,
        } = res
        else {
            panic!("{res:?}")
        };
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(head.headers.get_all("x-many").iter().count(), 2);
        assert!(matches!(data, Frame::Data { id: 7, data, end: true } if data == "hello"));
        assert!(matches!(
            reset,
            Frame::Reset {
                id: 9,
                reason: Reason::Refused
            }
        ));
        assert!(matches!(
            window,
            Frame::Window {
                id: 9,
                increment: 65_536
            }
        ));
    }

    #[test]
    fn hostile_frames_are_refused_and_nothing_after_them_is_read() {
        let refused = |bytes: &[u8]| {
            let mut frames = Frames::new(Bytes::copy_from_slice(bytes));
            assert!(frames.next().unwrap().is_err(), "{bytes:?}");
            assert!(frames.next().is_none());
        };
        refused(&[0, 0, 0, 1, DATA]); // truncated header
        refused(&[0, 0, 0, 1, DATA, 0, 0, 0, 9, 1]); // longer than the message
        refused(&[0, 0, 0, 1, 42, 0, 0, 0, 0]); // unknown kind
        refused(&[0, 0, 0, 1, WINDOW, 0, 0, 0, 4, 0, 0, 0, 0]); // zero increment
        refused(&[0, 0, 0, 1, WINDOW, 0, 0, 0, 4, 0x80, 0, 0, 0]); // over 2^31 - 1
        refused(&[0, 0, 0, 1, RESET, 0, 0, 0, 2, 0, 0]); // reset of the wrong length
        // A header count far beyond what the head holds.
        refused(&[0, 0, 0, 1, RESPONSE, 0, 0, 0, 4, 0, 200, 0xff, 0xff]);
        // A data frame over 16 KiB.
        let mut out = BytesMut::new();
        put_header(&mut out, 1, DATA, false, MAX_DATA + 1);
        out.put_slice(&vec![0; MAX_DATA + 1]);
        refused(&out);
    }

    #[test]
    fn malformed_heads_are_refused() {
        let head = |method: &[u8], path: &[u8], block: &[u8]| {
            let mut out = BytesMut::new();
            let len = 2 + method.len() + 2 + path.len() + block.len();
            put_header(&mut out, 1, REQUEST, true, len);
            out.put_u16(method.len() as u16);
            out.put_slice(method);
            out.put_u16(path.len() as u16);
            out.put_slice(path);
            out.put_slice(block);
            one(out)
        };
        assert!(head(b"GET", b"/api/tags", &[0, 0]).is_ok());
        assert!(head(b"G T", b"/api/tags", &[0, 0]).is_err(), "method");
        assert!(
            head(b"GET", b"http://elsewhere/", &[0, 0]).is_err(),
            "absolute path"
        );
        assert!(head(b"GET", b"/a b", &[0, 0]).is_err(), "space in the path");
        assert!(
            head(b"GET", b"/", &[0, 1, 0, 1, b' ', 0, 0]).is_err(),
            "header name"
        );
        assert!(
            head(b"GET", b"/", &[0, 1, 0, 1, b'a', 0, 1, b'\n']).is_err(),
            "header value"
        );
        assert!(head(b"GET", b"/", &[0, 0, 9]).is_err(), "trailing bytes");
        assert!(
            head(b"GET", b"/", &[0, 1, 0, 1]).is_err(),
            "truncated header"
        );
    }

    #[test]
    fn heads_over_the_limit_are_not_written() {
        let mut headers = HeaderMap::new();
        let big = "v".repeat(40_000);
        headers.insert("a", HeaderValue::from_str(&big).unwrap());
        headers.insert("b", HeaderValue::from_str(&big).unwrap());
        let mut out = BytesMut::new();
        assert!(put_request(&mut out, 1, &Method::GET, "/", &headers, true).is_err());
        assert!(put_response(&mut out, 1, StatusCode::OK, &headers, true).is_err());
        assert!(out.is_empty(), "nothing half-written");
    }
}
