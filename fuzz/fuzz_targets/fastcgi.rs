#![no_main]
//! Any bytes, read as a stream of records: the FastCGI parsers never panic,
//! and every pair checked by parse_pairs is walked.
use corral_proto::{fastcgi, Status};
use fastcgi::RecordType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut params = Vec::new();
    while let Ok(Status::Complete(record, n)) = fastcgi::parse_record(rest) {
        assert!(n >= fastcgi::HEADER_LEN && n <= rest.len());
        rest = &rest[n..];
        match record.kind {
            RecordType::BeginRequest => drop(fastcgi::parse_begin_request(record.content)),
            RecordType::Params => params.extend_from_slice(record.content),
            RecordType::GetValues => {
                fastcgi::parse_pairs(record.content).into_iter().flatten().for_each(drop)
            }
            _ => {}
        }
    }
    if let Ok(mut pairs) = fastcgi::parse_pairs(&params) {
        assert!(pairs.all(|(name, _)| !name.is_empty()));
    }
    // The raw bytes as one name-value block, too.
    let _ = fastcgi::parse_pair(data);
    fastcgi::parse_pairs(data).into_iter().flatten().for_each(drop);
});
