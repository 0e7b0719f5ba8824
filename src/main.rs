//! The `ferrotune` command line: a thin layer over the library.

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
mod cli;

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    let code = match cli::run() {
        Ok(()) => 0,
        Err(e) => {
            // One write, so the lines of ranks sharing a terminal do not interleave.
            use std::io::Write;
            let _ = std::io::stderr().write_all(format!("error: {e}\n").as_bytes());
            e.exit_code()
        }
    };
    std::process::exit(code);
}
