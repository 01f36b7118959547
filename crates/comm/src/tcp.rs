//! Tensor-parallel ranks in separate processes (or hosts), joined in a ring
//! of TCP connections: each rank sends to the next and receives from the
//! previous. All-reduce is the bandwidth-optimal ring algorithm
//! (reduce-scatter, then all-gather), so every rank ends with identical bits.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use candle_core::{DType, Result, Tensor};

use crate::hello::{self, Wait};
use crate::{last_dim, ring_chunk, Communicator};

const MAGIC: &[u8; 8] = b"strataTP";
/// Messages up to this size are sent before receiving; the kernel's send
/// buffer (16 KiB at least on Linux) holds them while the peer catches up.
const SMALL_MESSAGE: usize = 16 << 10;

#[derive(Debug)]
struct Links {
    next: TcpStream,
    prev: TcpStream,
}

/// One rank of a TCP ring. Its links can be (re)connected while the models
/// that hold it keep their weights: a replaced rank rejoins the survivors'
/// ring without a reload. A failed exchange takes the links down (the
/// stream is out of step), and every collective fails until the next
/// `connect`.
#[derive(Debug)]
pub struct TcpComm {
    rank: usize,
    world_size: usize,
    links: Mutex<Option<Links>>,
}

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("tcp communicator: {msg}"))
}

impl TcpComm {
    /// Rank `rank` of a ring of `world_size`, not yet connected.
    pub fn new(rank: usize, world_size: usize) -> Self {
        Self {
            rank,
            world_size,
            links: Mutex::new(None),
        }
    }

    /// A new rank, connected (see [`connect`](Self::connect)).
    pub fn join(
        rank: usize,
        listener: TcpListener,
        addrs: &[SocketAddr],
        token: &str,
        wait: impl Into<Wait>,
    ) -> Result<Self> {
        let comm = Self::new(rank, addrs.len());
        comm.connect(&listener, addrs, token, wait)?;
        Ok(comm)
    }

    /// (Re)joins the ring on a listener bound beforehand (its address
    /// announced as `addrs[rank]`); every link presents and checks the
    /// cluster `token`. Every rank must call it at about the same time.
    pub fn connect(
        &self,
        listener: &TcpListener,
        addrs: &[SocketAddr],
        token: &str,
        wait: impl Into<Wait>,
    ) -> Result<()> {
        let wait = wait.into();
        let (rank, world_size) = (self.rank, self.world_size);
        // Old links first: a peer that reconnects must not meet them.
        *self.links.lock().expect("poisoned") = None;
        if addrs.len() != world_size || rank >= world_size {
            return Err(err(format!(
                "rank {rank} of {world_size} given a ring of {} addresses",
                addrs.len()
            )));
        }
        if world_size == 1 {
            return Ok(());
        }
        let next_rank = (rank + 1) % world_size;
        let prev_rank = (rank + world_size - 1) % world_size;
        // Connect in a helper thread while this one accepts: every rank does
        // both, so doing them in turn could deadlock.
        let next_addr = addrs[next_rank];
        let own_token = token.to_string();
        let dial_wait = wait.clone();
        let connector = std::thread::spawn(move || {
            hello::dial(next_addr, &dial_wait, MAGIC, rank as u64, &own_token)
        });
        listener.set_nonblocking(true).map_err(err)?;
        let prev = loop {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false).map_err(err)?;
                    match hello::receive(&mut s, MAGIC, token) {
                        Ok(from) if from as usize == prev_rank => break s,
                        // A stale dial from an earlier run of the ring, a
                        // stranger or a wrong token: refuse it, keep waiting.
                        Ok(from) => tracing::warn!(
                            "tensor-parallel ring: rank {rank} refused {peer}, which claims rank {from}"
                        ),
                        Err(e) => tracing::warn!("tensor-parallel ring: refused {peer}: {e}"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(why) = wait.over() {
                        return Err(err(format!(
                            "rank {rank}: the previous rank did not connect {why}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(err(e)),
            }
        };
        let next = connector
            .join()
            .map_err(|_| err("connector thread panicked"))?
            .map_err(|e| {
                err(format!(
                    "rank {rank} could not reach rank {next_rank} at {next_addr}: {e}"
                ))
            })?;
        for s in [&next, &prev] {
            s.set_nodelay(true).map_err(err)?;
        }
        *self.links.lock().expect("poisoned") = Some(Links { next, prev });
        Ok(())
    }

    /// True when the ring needs a `connect` before it can exchange.
    pub fn is_down(&self) -> bool {
        self.world_size > 1 && self.links.lock().expect("poisoned").is_none()
    }

    /// Second handles on the ring's connections: shutting them down from
    /// another thread ends an exchange blocked on a hung peer.
    pub fn shutdown_handles(&self) -> Vec<TcpStream> {
        // A collective holds the lock while it blocks; the handles are only
        // useful then, so take them right after `connect`.
        match &*self.links.lock().expect("poisoned") {
            Some(l) => [&l.next, &l.prev]
                .into_iter()
                .filter_map(|s| s.try_clone().ok())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Runs `exchange` on the links; a failure takes them down.
    fn with_links<T>(&self, exchange: impl FnOnce(&mut Links) -> Result<T>) -> Result<T> {
        let mut guard = self.links.lock().expect("poisoned");
        let links = guard.as_mut().ok_or_else(|| {
            err(format!(
                "rank {} is not connected to its ring (a peer was lost)",
                self.rank
            ))
        })?;
        let r = exchange(links);
        if r.is_err() {
            *guard = None;
        }
        r
    }

    /// Sends `out` to the next rank while receiving `incoming_len` floats
    /// from the previous one (concurrently, so large messages cannot deadlock).
    fn shift(links: &mut Links, out: &[f32], incoming_len: usize) -> Result<Vec<f32>> {
        let mut incoming = vec![0f32; incoming_len];
        let Links { next, prev } = links;
        // Decode-sized messages fit the socket buffers: every rank can write
        // first and read after without waiting on a peer, and without the
        // cost of a thread per exchange (it dominated decode latency).
        if std::mem::size_of_val(out) <= SMALL_MESSAGE {
            next.write_all(as_bytes(out))
                .map_err(|e| err(format!("send: {e}")))?;
            prev.read_exact(as_bytes_mut(&mut incoming))
                .map_err(|e| err(format!("receive: {e}")))?;
            return Ok(incoming);
        }
        std::thread::scope(|s| {
            let sender = s.spawn(move || next.write_all(as_bytes(out)));
            let received = prev.read_exact(as_bytes_mut(&mut incoming));
            let sent = sender.join().map_err(|_| err("sender thread panicked"))?;
            sent.map_err(|e| err(format!("send: {e}")))?;
            received.map_err(|e| err(format!("receive: {e}")))
        })?;
        Ok(incoming)
    }
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: every byte pattern is a valid f32 (NaNs included).
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

pub(crate) fn to_f32(t: &Tensor) -> Result<(Vec<f32>, DType)> {
    let dtype = t.dtype();
    Ok((t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, dtype))
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.world_size == 1 {
            return Ok(t.clone());
        }
        self.with_links(|links| self.ring_all_reduce(links, t))
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        if self.world_size == 1 {
            return Ok(t.clone());
        }
        self.with_links(|links| self.ring_all_gather(links, t, dim))
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if self.world_size == 1 {
            return Ok(t.clone());
        }
        self.with_links(|links| self.ring_broadcast(links, t, root))
    }
}

impl TcpComm {
    fn ring_all_reduce(&self, links: &mut Links, t: &Tensor) -> Result<Tensor> {
        let (mut data, dtype) = to_f32(t)?;
        let n = self.world_size;
        let cols = last_dim(t);
        let rows = data.len() / cols;
        // A chunk is a range of columns in every row (see `ring_chunk`).
        let pack = |data: &[f32], c: usize| -> Vec<f32> {
            let r = ring_chunk(cols, n, c);
            (0..rows)
                .flat_map(|row| {
                    data[row * cols + r.start..row * cols + r.end]
                        .iter()
                        .copied()
                })
                .collect()
        };
        let chunk_len = |c: usize| rows * ring_chunk(cols, n, c).len();
        // Reduce-scatter: after n-1 steps, rank r holds the full sum of chunk r+1.
        for step in 0..n - 1 {
            let send = (self.rank + n - step) % n;
            let recv = (self.rank + n - step - 1) % n;
            let incoming = Self::shift(links, &pack(&data, send), chunk_len(recv))?;
            let r = ring_chunk(cols, n, recv);
            for (row, part) in incoming.chunks(r.len().max(1)).enumerate().take(rows) {
                for (d, x) in data[row * cols + r.start..row * cols + r.end]
                    .iter_mut()
                    .zip(part)
                {
                    *d += x;
                }
            }
        }
        // All-gather the reduced chunks around the ring.
        for step in 0..n - 1 {
            let send = (self.rank + 1 + n - step) % n;
            let recv = (self.rank + n - step) % n;
            let incoming = Self::shift(links, &pack(&data, send), chunk_len(recv))?;
            let r = ring_chunk(cols, n, recv);
            for (row, part) in incoming.chunks(r.len().max(1)).enumerate().take(rows) {
                data[row * cols + r.start..row * cols + r.end].copy_from_slice(part);
            }
        }
        Tensor::from_vec(data, t.shape(), t.device())?.to_dtype(dtype)
    }

    fn ring_all_gather(&self, links: &mut Links, t: &Tensor, dim: usize) -> Result<Tensor> {
        let (mine, dtype) = to_f32(t)?;
        let n = self.world_size;
        let mut parts: Vec<Option<Vec<f32>>> = vec![None; n];
        parts[self.rank] = Some(mine.clone());
        let mut passing = mine;
        for step in 0..n - 1 {
            passing = Self::shift(links, &passing, passing.len())?;
            parts[(self.rank + n - step - 1) % n] = Some(passing.clone());
        }
        let tensors = parts
            .into_iter()
            .map(|p| Tensor::from_vec(p.expect("filled by the ring"), t.shape(), t.device()))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&tensors, dim)?.to_dtype(dtype)
    }

    fn ring_broadcast(&self, links: &mut Links, t: &Tensor, root: usize) -> Result<Tensor> {
        let (data, dtype) = to_f32(t)?;
        let n = self.world_size;
        // Along the ring from the root: receive from the previous rank unless
        // we are the root, forward unless the next rank is the root.
        let value = if self.rank == root {
            data
        } else {
            let mut v = vec![0f32; data.len()];
            links
                .prev
                .read_exact(as_bytes_mut(&mut v))
                .map_err(|e| err(format!("receive: {e}")))?;
            v
        };
        if (self.rank + 1) % n != root {
            links
                .next
                .write_all(as_bytes(&value))
                .map_err(|e| err(format!("send: {e}")))?;
        }
        Tensor::from_vec(value, t.shape(), t.device())?.to_dtype(dtype)
    }
}
