//! The `chatgate` binary: command-line parsing lives in `chatgate::cli`.

fn main() {
    std::process::exit(chatgate::cli::main());
}
