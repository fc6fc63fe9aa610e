//! Fuzzes the upstream SSE parser through the stream transcoder: the first byte chooses
//! where the input is cut into pieces (as TCP reads would cut it). It must never panic,
//! and after `finish` the stream is either finished or failed, never still open.
#![no_main]

use bytes::BytesMut;
use chatgate::chat::{DataFormat, StreamStatus, StreamTranscoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (step, body) = match data {
        [first, rest @ ..] => ((*first as usize % 64) + 1, rest),
        [] => (1, data),
    };
    let format = if step % 2 == 0 {
        DataFormat::Text
    } else {
        DataFormat::Json
    };
    let mut transcoder = StreamTranscoder::new(format, 4096);
    let mut out = BytesMut::new();
    transcoder.start(&mut out);
    let mut status = StreamStatus::Open;
    for piece in body.chunks(step) {
        status = transcoder.feed(piece, &mut out);
        if status != StreamStatus::Open {
            break;
        }
    }
    if status == StreamStatus::Open {
        status = transcoder.finish(&mut out);
    }
    assert_ne!(status, StreamStatus::Open);
});
