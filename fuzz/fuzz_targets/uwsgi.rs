#![no_main]
//! Any bytes: the uwsgi parser never panics, and a packet it accepts stays
//! inside the input and walks to the end of its vars block.
use corral_proto::{uwsgi, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Status::Complete(req, n)) = uwsgi::parse_request(data) {
        assert!(n <= data.len() && n == uwsgi::HEADER_LEN + req.vars_block().len());
        let walked: usize = req
            .vars()
            .map(|(k, v)| {
                assert!(!k.is_empty());
                4 + k.len() + v.len()
            })
            .sum();
        assert_eq!(walked, req.vars_block().len());
    }
});
