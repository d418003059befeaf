//! The daemon's IPC line handling on an arbitrary byte stream, as a local process could send
//! it: the framing (`read_line`, bounded by `MAX_LINE_BYTES`) and the decoding of each line
//! (`decode_request`).
//!
//! Never panics; every line handed out is bounded and newline-free; a line that decodes is a
//! request that survives a round trip, and one that does not gets a `bad_request` reply.

#![no_main]

use std::sync::OnceLock;

use cloudllm_daemon::ipc::{decode_request, read_line};
use cloudllm_proto::ipc::{ErrorCode, MAX_LINE_BYTES, Response, to_line};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let mut reader = tokio::io::BufReader::new(data);
        // Each round consumes at least one byte or ends: at most `data.len() + 1` rounds.
        for _ in 0..=data.len() {
            let line = match read_line(&mut reader).await {
                Ok(Some(line)) => line,
                Ok(None) | Err(_) => return,
            };
            assert!(
                line.len() <= MAX_LINE_BYTES,
                "a line over the limit got through"
            );
            assert!(!line.contains(&b'\n'), "a line holds a newline");
            match decode_request(&line) {
                Ok(request) => {
                    let encoded = to_line(&request);
                    let again = decode_request(&encoded[..encoded.len() - 1]);
                    assert_eq!(
                        again.as_ref(),
                        Ok(&request),
                        "a request changed on a round trip"
                    );
                }
                Err(reply) => assert!(
                    matches!(
                        *reply,
                        Response::Error {
                            code: ErrorCode::BadRequest,
                            ..
                        }
                    ),
                    "an undecodable line got {reply:?}"
                ),
            }
        }
    });
});
