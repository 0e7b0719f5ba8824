//! Length-prefixed frames over TCP: `[tag u8][length u64 LE][payload]`.

use crate::Result;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const HELLO: u8 = 1;
pub const OK: u8 = 2;
pub const ABORT: u8 = 3;
pub const DATA: u8 = 4;

/// Why a read did not return a frame.
pub enum ReadFail {
    TimedOut,
    Closed,
    Other(String),
}

pub fn write_frame(s: &mut TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

/// Reads one frame, waiting at most `timeout` for it to start.
pub fn read_frame(s: &mut TcpStream, timeout: Duration) -> std::result::Result<(u8, Vec<u8>), ReadFail> {
    read_frame_at_most(s, timeout, u64::MAX)
}

/// [`read_frame`] for a frame of at most `max_len` payload bytes: a longer one (a stray
/// client on the port, not one of our ranks) fails before anything is allocated for it.
pub fn read_frame_at_most(
    s: &mut TcpStream,
    timeout: Duration,
    max_len: u64,
) -> std::result::Result<(u8, Vec<u8>), ReadFail> {
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(|e| ReadFail::Other(e.to_string()))?;
    let mut head = [0u8; 9];
    s.read_exact(&mut head).map_err(classify)?;
    // Once a frame has started, its body follows promptly.
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    if len > max_len {
        return Err(ReadFail::Other(format!(
            "a message of {len} bytes where at most {max_len} were expected"
        )));
    }
    let len = usize::try_from(len).map_err(|_| ReadFail::Other(format!("a message of {len} bytes")))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(classify)?;
    Ok((head[0], body))
}

fn classify(e: std::io::Error) -> ReadFail {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ReadFail::TimedOut,
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => ReadFail::Closed,
        _ => ReadFail::Other(e.to_string()),
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_f32(b: &[u8]) -> Result<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return Err(crate::msg!(
            "a collective message of {} bytes is not whole f32 values",
            b.len()
        ));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}
