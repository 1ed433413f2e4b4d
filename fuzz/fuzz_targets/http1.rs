#![no_main]
//! Any bytes: the head parser and the chunked decoder never panic, and what
//! they accept stays inside the input.
use corral_proto::http1::{parse_head, Chunk, ChunkedDecoder, Head, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut head = Head::default();
    if let Ok(corral_proto::Status::Complete((), n)) = parse_head(data, &Limits::default(), &mut head) {
        assert!(n <= data.len() && head.fields.iter().all(|f| f.value.end <= n));
        let mut dec = ChunkedDecoder::new();
        let mut rest = &data[n..];
        while let Ok(Chunk::Data { consumed, .. } | Chunk::NeedMore { consumed }) = dec.decode(rest) {
            if consumed == 0 {
                break;
            }
            rest = &rest[consumed..];
        }
    }
});
