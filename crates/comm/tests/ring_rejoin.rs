//! A TCP ring between nodes outlives a lost rank: the survivors' links go
//! down, a new process takes the rank, and every rank reconnects the same
//! communicators (the models holding them keep their weights).

use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use strata_comm::{Communicator, TcpComm};

const TIMEOUT: Duration = Duration::from_secs(10);

fn input(rank: usize) -> Tensor {
    let v: Vec<f32> = (0..6).map(|i| (rank * 10 + i) as f32).collect();
    Tensor::from_vec(v, (2, 3), &Device::Cpu).unwrap()
}

fn sum(world: usize) -> Vec<f32> {
    (0..6)
        .map(|i| (0..world).map(|r| (r * 10 + i) as f32).sum())
        .collect()
}

/// Connects every rank at once, as the nodes' starts do.
fn connect(ranks: &[(Arc<TcpComm>, &TcpListener)], addrs: &[SocketAddr]) {
    std::thread::scope(|s| {
        for (comm, listener) in ranks {
            s.spawn(move || comm.connect(listener, addrs, "tok", TIMEOUT).unwrap());
        }
    });
}

/// Runs an all-reduce on each of `comms` at once.
fn all_reduce(comms: &[Arc<TcpComm>]) -> Vec<candle_core::Result<Vec<f32>>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || {
                    c.all_reduce_sum(&input(c.rank()))?
                        .flatten_all()?
                        .to_vec1::<f32>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_replaced_rank_rejoins_the_survivors_ring() {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let comms: Vec<Arc<TcpComm>> = (0..3).map(|r| Arc::new(TcpComm::new(r, 3))).collect();
    assert!(comms.iter().all(|c| c.is_down()), "not connected yet");
    let pairs: Vec<_> = comms.iter().cloned().zip(&listeners).collect();
    connect(&pairs, &addrs);
    for r in all_reduce(&comms) {
        assert_eq!(r.unwrap(), sum(3));
    }

    // Rank 2's process dies: its sockets close, the survivors' exchange
    // fails and leaves their links down.
    let survivors = &comms[..2];
    for s in comms[2].shutdown_handles() {
        s.shutdown(Shutdown::Both).unwrap();
    }
    for r in all_reduce(survivors) {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("tcp communicator"), "{e}");
    }
    assert!(survivors.iter().all(|c| c.is_down()));
    let e = survivors[0]
        .all_reduce_sum(&input(0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not connected"),
        "a down ring fails at once: {e}"
    );

    // A new process takes rank 2 on another port; the survivors reconnect
    // the communicators they hold.
    let new_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    addrs[2] = new_listener.local_addr().unwrap();
    let replaced = Arc::new(TcpComm::new(2, 3));
    let comms = vec![comms[0].clone(), comms[1].clone(), replaced.clone()];
    let pairs = vec![
        (comms[0].clone(), &listeners[0]),
        (comms[1].clone(), &listeners[1]),
        (replaced, &new_listener),
    ];
    connect(&pairs, &addrs);
    for r in all_reduce(&comms) {
        assert_eq!(r.unwrap(), sum(3));
    }
}

#[test]
fn shutting_the_ring_down_ends_an_exchange_blocked_on_a_hung_peer() {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let comms: Vec<Arc<TcpComm>> = (0..2).map(|r| Arc::new(TcpComm::new(r, 2))).collect();
    let pairs: Vec<_> = comms.iter().cloned().zip(&listeners).collect();
    connect(&pairs, &addrs);
    let handles = comms[0].shutdown_handles();
    assert_eq!(handles.len(), 2, "next and previous");
    // Rank 1 hangs (never exchanges): rank 0 waits for it until the
    // handles shut the links.
    std::thread::scope(|s| {
        let waiting = s.spawn(|| comms[0].all_reduce_sum(&input(0)));
        for h in &handles {
            h.shutdown(Shutdown::Both).unwrap();
        }
        assert!(waiting.join().unwrap().is_err());
    });
    assert!(comms[0].is_down());
}
