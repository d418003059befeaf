//! The tunnel's frames, decoded from arbitrary bytes: each end reads the messages of a peer it
//! does not trust (the relay a daemon's, the daemon a relay's).
//!
//! Decoding never panics, stops at the first broken frame, and every head that decodes
//! survives a round trip (encode, decode again, same head).

#![no_main]

use bytes::{Bytes, BytesMut};
use cloudllm_tunnel::mux::frame::{self, Frame, Frames};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for frame in Frames::new(Bytes::copy_from_slice(data)) {
        let Ok(frame) = frame else { break };
        let mut out = BytesMut::new();
        match &frame {
            Frame::Request { id, head, end } => {
                let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
                frame::put_request(&mut out, *id, &head.method, path, &head.headers, *end)
                    .expect("a head that was read can be written");
                let again = Frames::new(out.freeze()).next().unwrap().unwrap();
                let Frame::Request { head: back, .. } = again else {
                    panic!("kind changed")
                };
                assert_eq!(
                    (&back.method, &back.uri, &back.headers),
                    (&head.method, &head.uri, &head.headers)
                );
            }
            Frame::Response { id, head, end } => {
                frame::put_response(&mut out, *id, head.status, &head.headers, *end)
                    .expect("a head that was read can be written");
                let again = Frames::new(out.freeze()).next().unwrap().unwrap();
                let Frame::Response { head: back, .. } = again else {
                    panic!("kind changed")
                };
                assert_eq!((back.status, &back.headers), (head.status, &head.headers));
            }
            _ => {}
        }
    }
});
