#![no_main]
//! Any bytes: the PROXY header parser never panics, uses no more than it was
//! given, and what it accepts is what `detect` called a header.
use corral_proto::{proxy, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Status::Complete(_, n)) = proxy::parse(data) {
        assert!(n <= data.len());
        assert_eq!(proxy::detect(data), proxy::Detect::Yes);
    }
});
