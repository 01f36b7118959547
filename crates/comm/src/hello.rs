//! The first bytes on every connection between ranks: what it is for, which
//! rank is calling, and the cluster token (empty when the cluster has none).
//! A connection that fails the check is closed before any data flows.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
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

/// How long a link setup waits for its peer: up to a timeout, and no
/// longer than the setup is wanted (`unless`: a node stops connecting
/// for a start that a newer one replaced). A `Duration` is a plain timeout.
#[derive(Clone)]
pub struct Wait {
    timeout: Duration,
    deadline: Instant,
    abandoned: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl Wait {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            deadline: Instant::now() + timeout,
            abandoned: None,
        }
    }

    /// Also stops waiting once `abandoned` says so.
    pub fn unless(mut self, abandoned: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.abandoned = Some(Arc::new(abandoned));
        self
    }

    fn is_abandoned(&self) -> bool {
        self.abandoned.as_ref().is_some_and(|f| f())
    }

    /// Why to stop waiting now, if it is time to: "within <timeout>" (as
    /// in "did not connect within 2s") or the setup was abandoned.
    pub(crate) fn over(&self) -> Option<String> {
        if self.is_abandoned() {
            Some("before a newer start replaced this one".into())
        } else if Instant::now() >= self.deadline {
            Some(format!("within {:?}", self.timeout))
        } else {
            None
        }
    }
}

impl From<Duration> for Wait {
    fn from(timeout: Duration) -> Self {
        Self::new(timeout)
    }
}

/// Connects to `addr` and says hello, retrying while `wait` lasts so the
/// peer may start listening later.
pub(crate) fn dial(
    addr: SocketAddr,
    wait: &Wait,
    magic: &[u8; 8],
    rank: u64,
    token: &str,
) -> std::io::Result<TcpStream> {
    loop {
        if wait.is_abandoned() {
            return Err(std::io::Error::other(
                "abandoned: a newer start replaced this one",
            ));
        }
        let last_try = Instant::now() >= wait.deadline;
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
