#![no_main]
//! Any bytes: the SCGI parser never panics, and a request it accepts has
//! CONTENT_LENGTH first, SCGI=1, and walks to the end of its header block.
use corral_proto::{scgi, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Status::Complete(req, n)) = scgi::parse_request(data) {
        assert!(n <= data.len());
        let walked: usize = req.headers().map(|(k, v)| k.len() + v.len() + 2).sum();
        assert_eq!(walked, req.header_block().len());
        assert_eq!(req.headers().next().map(|(k, _)| k), Some(&b"CONTENT_LENGTH"[..]));
        assert_eq!(req.get(b"SCGI"), Some(&b"1"[..]));
    }
});
