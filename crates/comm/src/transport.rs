//! The pipeline data plane: activations from one stage to the next over a
//! framed TCP stream. A frame is a fixed header (magic, version, dtype, rank,
//! step id, dims, payload length) and the raw little-endian elements, so the
//! receiver can check a frame before it allocates for it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor};

use crate::hello::{self, Wait};

const MAGIC: &[u8; 4] = b"STRA";
/// Opens every data-plane connection (see `hello`).
const HELLO: &[u8; 8] = b"strataDP";
const VERSION: u8 = 1;
/// Frames above this are refused rather than allocated (4 GiB).
const MAX_PAYLOAD: u64 = 4 << 30;

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("activation transport: {msg}"))
}

fn dtype_code(d: DType) -> Result<u8> {
    Ok(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        other => return Err(err(format!("cannot send {other:?} activations"))),
    })
}

fn dtype_of(code: u8) -> Result<DType> {
    Ok(match code {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::BF16,
        other => return Err(err(format!("unknown dtype code {other}"))),
    })
}

/// One direction of a stage-to-stage link.
#[derive(Debug)]
pub struct TcpTransport {
    stream: TcpStream,
    bytes_sent: u64,
    bytes_received: u64,
}

impl TcpTransport {
    /// Connects to the next stage as node `rank`, retrying while `wait`
    /// lasts (it may start later), and presents the cluster token.
    pub fn connect(
        addr: SocketAddr,
        rank: u64,
        token: &str,
        wait: impl Into<Wait>,
    ) -> Result<Self> {
        let wait = wait.into();
        let stream = hello::dial(addr, &wait, HELLO, rank, token)
            .map_err(|e| err(format!("could not reach {addr}: {e}")))?;
        Self::from_stream(stream)
    }

    /// Accepts the previous stage's connection while `wait` lasts, and
    /// refuses callers without the cluster token. Returns the caller's rank.
    pub fn accept(
        listener: &TcpListener,
        token: &str,
        wait: impl Into<Wait>,
    ) -> Result<(Self, u64)> {
        let wait = wait.into();
        listener.set_nonblocking(true).map_err(err)?;
        loop {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false).map_err(err)?;
                    match hello::receive(&mut s, HELLO, token) {
                        Ok(rank) => return Ok((Self::from_stream(s)?, rank)),
                        // A stranger or a wrong token: refuse it, keep waiting.
                        Err(e) => tracing::warn!("data plane: refused {peer}: {e}"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(why) = wait.over() {
                        return Err(err(format!("the previous stage did not connect {why}")));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(err(e)),
            }
        }
    }

    fn from_stream(stream: TcpStream) -> Result<Self> {
        stream.set_nodelay(true).map_err(err)?;
        Ok(Self {
            stream,
            bytes_sent: 0,
            bytes_received: 0,
        })
    }

    /// A second handle on the connection, for another thread to shut it
    /// down: a step blocked on a peer that is gone then fails at once.
    pub fn shutdown_handle(&self) -> std::io::Result<TcpStream> {
        self.stream.try_clone()
    }

    /// Bytes written so far, headers included (for bytes-per-token figures).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// Sends one step's activations.
    pub fn send(&mut self, step_id: u64, t: &Tensor) -> Result<()> {
        let dims = t.dims();
        let t = t.contiguous()?;
        let payload: Vec<u8> = match t.dtype() {
            DType::F32 => t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::F16 => t
                .flatten_all()?
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::BF16 => t
                .flatten_all()?
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            other => return Err(err(format!("cannot send {other:?} activations"))),
        };
        let mut header = Vec::with_capacity(24 + 8 * dims.len());
        header.extend_from_slice(MAGIC);
        header.extend([VERSION, dtype_code(t.dtype())?, dims.len() as u8, 0]);
        header.extend(step_id.to_le_bytes());
        for d in dims {
            header.extend((*d as u64).to_le_bytes());
        }
        header.extend((payload.len() as u64).to_le_bytes());
        self.stream.write_all(&header).map_err(err)?;
        self.stream.write_all(&payload).map_err(err)?;
        self.bytes_sent += (header.len() + payload.len()) as u64;
        Ok(())
    }

    /// Receives one step's activations.
    pub fn recv(&mut self) -> Result<(u64, Tensor)> {
        let mut fixed = [0u8; 16];
        self.read(&mut fixed)?;
        if &fixed[..4] != MAGIC {
            return Err(err("the peer is not a strata stage (bad magic)"));
        }
        if fixed[4] != VERSION {
            return Err(err(format!(
                "frame version {} (this build speaks {VERSION})",
                fixed[4]
            )));
        }
        let dtype = dtype_of(fixed[5])?;
        let rank = fixed[6] as usize;
        let step_id = u64::from_le_bytes(fixed[8..16].try_into().expect("8 bytes"));
        let mut rest = vec![0u8; 8 * rank + 8];
        self.read(&mut rest)?;
        let dims: Vec<usize> = rest[..8 * rank]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
            .collect();
        let len = u64::from_le_bytes(rest[8 * rank..].try_into().expect("8 bytes"));
        let expected = dims.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        if len != expected || len > MAX_PAYLOAD {
            return Err(err(format!(
                "frame of {len} bytes for shape {dims:?} {dtype:?} (expected {expected})"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        self.read(&mut payload)?;
        let t = match dtype {
            DType::F32 => Tensor::from_vec(
                payload
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect::<Vec<_>>(),
                dims,
                &Device::Cpu,
            )?,
            DType::F16 => Tensor::from_vec(
                payload
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                    .collect::<Vec<_>>(),
                dims,
                &Device::Cpu,
            )?,
            _ => Tensor::from_vec(
                payload
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]))
                    .collect::<Vec<_>>(),
                dims,
                &Device::Cpu,
            )?,
        };
        Ok((step_id, t))
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.stream
            .read_exact(buf)
            .map_err(|e| err(format!("the previous stage went away: {e}")))?;
        self.bytes_received += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn pair() -> (TcpTransport, TcpTransport) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let tx = std::thread::spawn(move || TcpTransport::connect(addr, 3, "s3cret", T).unwrap());
        let (rx, rank) = TcpTransport::accept(&listener, "s3cret", T).unwrap();
        assert_eq!(rank, 3);
        (tx.join().unwrap(), rx)
    }

    #[test]
    fn a_wrong_token_is_refused_and_the_right_one_still_admitted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let callers = std::thread::spawn(move || {
            let mut bad = TcpTransport::connect(addr, 1, "guess", T).unwrap();
            let t = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
            // The listener drops the stranger: its frames go nowhere.
            let _ = bad.send(0, &t);
            TcpTransport::connect(addr, 2, "s3cret", T).unwrap()
        });
        let (_rx, rank) = TcpTransport::accept(&listener, "s3cret", T).unwrap();
        assert_eq!(rank, 2);
        callers.join().unwrap();
        // Nobody else calls: the wait ends with a clear error.
        let e = TcpTransport::accept(&listener, "s3cret", Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("did not connect"), "{e}");
    }

    #[test]
    fn an_abandoned_wait_ends_before_its_timeout() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // A port that was bound and let go: nobody will ever answer there.
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let replaced = Arc::new(AtomicBool::new(false));
        let wait = || {
            let r = replaced.clone();
            Wait::new(Duration::from_secs(60)).unless(move || r.load(Ordering::SeqCst))
        };
        let (dial, accept) = (wait(), wait());
        let dialer = std::thread::spawn(move || TcpTransport::connect(dead, 1, "", dial));
        let acceptor = std::thread::spawn(move || TcpTransport::accept(&listener, "", accept));
        replaced.store(true, Ordering::SeqCst);
        // Both end now, saying why, not in a minute.
        let e = dialer.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("newer start"), "{e}");
        let e = acceptor.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("newer start"), "{e}");
    }

    #[test]
    fn frames_round_trip_in_order_with_their_step_ids() {
        let (mut tx, mut rx) = pair();
        let a = Tensor::from_vec(
            (0..12).map(|i| i as f32 * 0.25 - 1.0).collect::<Vec<_>>(),
            (3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let b = a.to_dtype(DType::BF16).unwrap();
        let c = a.to_dtype(DType::F16).unwrap().reshape((2, 6)).unwrap();
        for (step, t) in [(7u64, &a), (8, &b), (9, &c)] {
            tx.send(step, t).unwrap();
        }
        for (step, t) in [(7u64, &a), (8, &b), (9, &c)] {
            let (s, got) = rx.recv().unwrap();
            assert_eq!(s, step);
            assert_eq!(got.dims(), t.dims());
            assert_eq!(got.dtype(), t.dtype());
            assert_eq!(
                got.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            );
        }
        // 3x4 f32: 48 payload bytes + 16 fixed + 2 dims + length.
        assert_eq!(tx.bytes_sent(), rx.bytes_received());
        assert_eq!(tx.bytes_sent(), (48 + 40) + (24 + 40) + (24 + 40));
    }

    #[test]
    fn garbage_and_a_vanished_peer_are_clear_errors() {
        let (mut tx, mut rx) = pair();
        tx.stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert!(rx.recv().unwrap_err().to_string().contains("bad magic"));
        let (tx, mut rx) = pair();
        drop(tx);
        assert!(rx.recv().unwrap_err().to_string().contains("went away"));
    }
}
