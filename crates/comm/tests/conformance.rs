//! One suite, every backend: each collective gives the same answer on every
//! rank, whether ranks are threads sharing memory or peers on a TCP ring.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use candle_core::{Device, Tensor};
use strata_comm::{Communicator, SingleRank, TcpComm, ThreadComm};

type Group = Vec<Box<dyn Communicator>>;

fn single(world: usize) -> Group {
    assert_eq!(world, 1);
    vec![Box::new(SingleRank)]
}

fn threads(world: usize) -> Group {
    ThreadComm::group(world)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Communicator>)
        .collect()
}

fn tcp(world: usize) -> Group {
    // Every listener stays bound from here until its rank joins: a port
    // freed and re-bound later could be handed out twice (or to another
    // test's connection) in between.
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    // Ranks join from their own threads, as separate processes would.
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, listener)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                TcpComm::join(r, listener, &addrs, "", Duration::from_secs(10)).unwrap()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| Box::new(h.join().unwrap()) as Box<dyn Communicator>)
        .collect()
}

/// Runs `f(rank, comm)` on every rank at once; returns the results in rank order.
fn on_all<R: Send>(group: Group, f: impl Fn(usize, &dyn Communicator) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                s.spawn(move || f(r, c.as_ref()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A rank's distinct input: `[3, 5]` (odd sizes test uneven ring chunks).
fn input(rank: usize) -> Tensor {
    let v: Vec<f32> = (0..15)
        .map(|i| (rank * 100 + i) as f32 * 0.5 - 3.0)
        .collect();
    Tensor::from_vec(v, (3, 5), &Device::Cpu).unwrap()
}

fn check(make: fn(usize) -> Group, world: usize) {
    // rank and world size
    let ids = on_all(make(world), |r, c| (r, c.rank(), c.world_size()));
    for (r, rank, ws) in ids {
        assert_eq!((rank, ws), (r, world));
    }

    // all_reduce_sum equals the sum computed here, identically on every rank.
    let want: Vec<Vec<f32>> = (0..world)
        .map(input)
        .reduce(|a, b| (a + b).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap();
    let got = on_all(make(world), |r, c| {
        c.all_reduce_sum(&input(r))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    });
    for g in &got {
        for (a, b) in g.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() < 1e-4, "all_reduce: {a} vs {b}");
        }
        assert_eq!(g, &got[0], "every rank gets the same bits");
    }

    // all_gather concatenates in rank order, on either dimension.
    for dim in [0, 1] {
        let want = Tensor::cat(&(0..world).map(input).collect::<Vec<_>>(), dim).unwrap();
        let got = on_all(make(world), |r, c| c.all_gather(&input(r), dim).unwrap());
        for g in got {
            assert_eq!(g.dims(), want.dims());
            assert_eq!(g.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        }
    }

    // broadcast from every root.
    for root in 0..world {
        let got = on_all(make(world), |r, c| {
            c.broadcast(&input(r), root)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        });
        for g in got {
            assert_eq!(g, input(root).to_vec2::<f32>().unwrap());
        }
    }

    // Many collectives in a row stay in step.
    let got = on_all(make(world), |r, c| {
        let mut t = input(r);
        for _ in 0..50 {
            t = (c.all_reduce_sum(&t).unwrap() / world as f64).unwrap();
        }
        t.to_vec2::<f32>().unwrap()
    });
    assert!(got.iter().all(|g| g == &got[0]));
}

#[test]
fn single_rank() {
    check(single, 1);
}

#[test]
fn threads_in_one_process() {
    for world in [1, 2, 3, 4] {
        check(threads, world);
    }
}

#[test]
fn tcp_ring() {
    for world in [1, 2, 3, 4] {
        check(tcp, world);
    }
}

#[test]
fn threads_and_tcp_sum_in_the_same_order_to_the_same_bits() {
    // Values whose sum depends on the order of additions in f32.
    let noisy = |rank: usize| {
        let v: Vec<f32> = (0..1001)
            .map(|i| {
                let x = ((i * 7919 + rank * 104_729) % 1000) as f32;
                (x - 500.0) * 1e-3 * 10f32.powi((i % 7) as i32 - 3)
            })
            .collect();
        Tensor::from_vec(v, (7, 143), &Device::Cpu).unwrap()
    };
    let sum = |g: Group| {
        on_all(g, |r, c| {
            c.all_reduce_sum(&noisy(r))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
    };
    let first_row = |g: Group| {
        on_all(g, |r, c| {
            let row = noisy(r).narrow(0, 0, 1).unwrap();
            c.all_reduce_sum(&row)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for world in [3, 4] {
        let a = sum(threads(world));
        let b = sum(tcp(world));
        for r in 0..world {
            assert_eq!(
                bits(&a[r]),
                bits(&b[r]),
                "world {world}, rank {r}: backends disagree"
            );
        }
        // A row sums the same alone as in a batch: batch invariance survives TP.
        for (name, alone) in [
            ("threads", first_row(threads(world))),
            ("tcp", first_row(tcp(world))),
        ] {
            assert_eq!(
                bits(&alone[0]),
                bits(&a[0][..143]),
                "{name}, world {world}: row 0 depends on the batch"
            );
        }
    }
}
