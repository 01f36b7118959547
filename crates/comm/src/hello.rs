//! The first bytes on every connection between ranks: what it is for, which
//! rank is calling, and the cluster token (empty when the cluster has none).
//! A connection that fails the check is closed before any data flows.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Tokens above this are refused rather than allocated.
const MAX_TOKEN: usize = 4096;

pub(crate) fn send(
    s: &mut TcpStream,
    magic: &[u8; 8],
    rank: u64,
    token: &str,
) -> std::io::Result<()> {
    let mut hello = Vec::with_capacity(20 + token.len());
    hello.extend_from_slice(magic);
    hello.extend(rank.to_le_bytes());
    hello.extend((token.len() as u32).to_le_bytes());
    hello.extend(token.as_bytes());
    s.write_all(&hello)
}

/// Connects to `addr` and says hello, retrying until `deadline` so the peer
/// may start listening later.
pub(crate) fn dial(
    addr: SocketAddr,
    deadline: Instant,
    magic: &[u8; 8],
    rank: u64,
    token: &str,
) -> std::io::Result<TcpStream> {
    loop {
        let last_try = Instant::now() >= deadline;
        match TcpStream::connect(addr) {
            // Dialing a port no one listens on yet can connect the socket to
            // itself (TCP simultaneous open) when the kernel picks that same
            // port as the local one; that is no peer, so try again.
            Ok(s) if s.local_addr().ok() == Some(addr) => {
                if last_try {
                    return Err(std::io::Error::other("connected only to itself"));
                }
            }
            Ok(mut s) => {
                send(&mut s, magic, rank, token)?;
                return Ok(s);
            }
            Err(e) if last_try => return Err(e),
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a hello and returns the caller's rank, or why it is refused.
pub(crate) fn receive(s: &mut TcpStream, magic: &[u8; 8], token: &str) -> Result<u64, String> {
    let mut fixed = [0u8; 20];
    s.read_exact(&mut fixed)
        .map_err(|e| format!("handshake: {e}"))?;
    if &fixed[..8] != magic {
        return Err("the peer is not a strata rank of this kind (bad magic)".into());
    }
    let rank = u64::from_le_bytes(fixed[8..16].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(fixed[16..].try_into().expect("4 bytes")) as usize;
    if len > MAX_TOKEN {
        return Err(format!("rank {rank} sent a {len}-byte cluster token"));
    }
    let mut given = vec![0u8; len];
    s.read_exact(&mut given)
        .map_err(|e| format!("handshake: {e}"))?;
    if !constant_time_eq(&given, token.as_bytes()) {
        return Err(format!("rank {rank} presented a wrong cluster token"));
    }
    Ok(rank)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
