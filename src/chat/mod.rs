//! The chat pipeline's pure cores: the client message array and its rewrite into an
//! OpenAI request, the non-streaming reply, the SSE transcoding of streamed replies, and
//! the token counts made when an upstream reports none. Nothing here does network I/O;
//! the gateway glue feeds bytes in and writes bytes out.

mod chunk_scan;
pub mod openai;
pub mod reply;
pub mod request;
pub mod sse_in;
pub mod sse_out;
pub mod stream;
pub mod token_count;
pub mod usage_strip;

pub use reply::{parse_completion, upstream_error_message, Completion, ReplyError, Usage};
pub use request::{
    build_openai_body, parse_messages, ChatMessage, MessagesError, Role, UpstreamRequestSpec,
};
pub use sse_in::{FinishSeen, SseError, UpstreamEvent, UpstreamSseParser, DEFAULT_MAX_EVENT_BYTES};
pub use sse_out::{write_error_event, write_message_event, DataFormat, KEEPALIVE_COMMENT};
pub use stream::{StreamStatus, StreamTranscoder};
