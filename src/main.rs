//! The `chatgate` binary: command-line parsing lives in `chatgate::cli`.

/// mimalloc instead of the system allocator: the request path makes many small, short-lived
/// allocations (Pingora's sessions, futures, header maps), and glibc's malloc/free were about
/// an eighth of the gateway's CPU time under load (see benches/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(chatgate::cli::main());
}
