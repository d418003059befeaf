//! The tunnel's and the IPC's JSON wire types, decoded from arbitrary bytes: the relay reads
//! `Control` messages (the hello among them) from a daemon it does not trust, the daemon reads IPC requests
//! from any local process that can open its socket, and clients read IPC responses.
//!
//! Decoding never panics, and whatever decodes survives a round trip (encode, decode again,
//! same value), so nothing a peer sends can turn into something else on the way through.

#![no_main]

use cloudllm_proto::Control;
use cloudllm_proto::ipc::{self, Request, Response};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Decodes `data` as a `T`; if it is one, checks that it encodes and decodes back to itself.
fn round_trip<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(value) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let line = ipc::to_line(&value);
    assert_eq!(
        line.iter().filter(|b| **b == b'\n').count(),
        1,
        "an encoded message is exactly one line"
    );
    let again: T = serde_json::from_slice(&line).expect("an encoded message decodes");
    assert_eq!(again, value);
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Control>(data);
    round_trip::<Request>(data);
    round_trip::<Response>(data);
});
