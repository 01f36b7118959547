//! Who this process is in the cluster, from flags or from where it was
//! launched: by hand (`--nnodes/--node-rank/--leader-addr`), as a
//! StatefulSet pod (`POD_INDEX` or the hostname's ordinal), or as a
//! LeaderWorkerSet pod (`LWS_*`). Flags win over the environment.

use anyhow::{bail, Result};

/// The cluster port when no address names one (torchrun's and vLLM's).
pub const DEFAULT_CLUSTER_PORT: u16 = 29500;

#[derive(Debug, Clone, Default)]
pub struct LaunchFlags {
    pub nnodes: Option<usize>,
    pub node_rank: Option<usize>,
    pub leader_addr: Option<String>,
    /// The headless Service that gives StatefulSet pods stable DNS names.
    pub headless_service: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub nnodes: usize,
    pub node_rank: usize,
    /// `host:port` of the leader's cluster service (`None` on one node).
    pub leader_addr: Option<String>,
    /// Where the rank came from, for the start-up log.
    pub source: &'static str,
}

/// Resolves the role from `flags`, the environment (`env`) and the hostname.
pub fn resolve(
    flags: &LaunchFlags,
    env: &dyn Fn(&str) -> Option<String>,
    hostname: &str,
) -> Result<Role> {
    let number = |name: &str| -> Result<Option<usize>> {
        match env(name).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => match v.trim().parse() {
                Ok(n) => Ok(Some(n)),
                Err(_) => bail!("{name}={v} is not a number"),
            },
        }
    };
    let with_port = |host: String| {
        if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host
        } else {
            format!("{host}:{DEFAULT_CLUSTER_PORT}")
        }
    };

    // LeaderWorkerSet: the group says everything.
    if let Some(group) = number("LWS_GROUP_SIZE")? {
        let nnodes = flags.nnodes.unwrap_or(group);
        let node_rank = match flags.node_rank {
            Some(r) => r,
            None => number("LWS_WORKER_INDEX")?.unwrap_or(0),
        };
        let leader = flags
            .leader_addr
            .clone()
            .or_else(|| env("LWS_LEADER_ADDRESS"));
        return finish(nnodes, node_rank, leader.map(with_port), "LeaderWorkerSet");
    }

    let nnodes = flags.nnodes.unwrap_or(1);
    if let Some(r) = flags.node_rank {
        return finish(
            nnodes,
            r,
            flags.leader_addr.clone().map(with_port),
            "--node-rank",
        );
    }
    if nnodes == 1 {
        return finish(
            1,
            0,
            flags.leader_addr.clone().map(with_port),
            "single node",
        );
    }
    // StatefulSet: POD_INDEX, or the ordinal that ends the pod's hostname.
    let (set_name, ordinal) = match hostname.rsplit_once('-') {
        Some((name, n)) if !name.is_empty() => (Some(name), n.parse::<usize>().ok()),
        _ => (None, None),
    };
    let (node_rank, source) = match (number("POD_INDEX")?, ordinal) {
        (Some(i), _) => (i, "POD_INDEX"),
        (None, Some(i)) => (i, "hostname ordinal"),
        (None, None) => bail!(
            "--nnodes {nnodes} needs this node's rank: pass --node-rank, set POD_INDEX, \
             or run with a StatefulSet hostname ending in -<ordinal> (this one is `{hostname}`)"
        ),
    };
    // Pod 0 of the same StatefulSet leads: `<set>-0[.<headless service>]`.
    let leader = match (&flags.leader_addr, set_name) {
        (Some(a), _) => Some(a.clone()),
        (None, Some(set)) => Some(match &flags.headless_service {
            Some(svc) => format!("{set}-0.{svc}"),
            None => format!("{set}-0"),
        }),
        (None, None) => None,
    };
    finish(nnodes, node_rank, leader.map(with_port), source)
}

fn finish(
    nnodes: usize,
    node_rank: usize,
    leader_addr: Option<String>,
    source: &'static str,
) -> Result<Role> {
    if nnodes == 0 {
        bail!("--nnodes must be at least 1");
    }
    if node_rank >= nnodes {
        bail!("node rank {node_rank} (from {source}) is outside a cluster of {nnodes} nodes");
    }
    if node_rank > 0 && leader_addr.is_none() {
        bail!("node {node_rank} needs the leader's address: pass --leader-addr HOST:PORT");
    }
    Ok(Role {
        nnodes,
        node_rank,
        leader_addr,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn role(flags: LaunchFlags, env: &[(&str, &str)], host: &str) -> Result<Role> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(&flags, &|k| env.get(k).cloned(), host)
    }

    #[test]
    fn no_flags_is_one_node() {
        let r = role(LaunchFlags::default(), &[], "laptop").unwrap();
        assert_eq!((r.nnodes, r.node_rank, r.leader_addr), (1, 0, None));
    }

    #[test]
    fn cli_flags_name_everything() {
        let flags = LaunchFlags {
            nnodes: Some(2),
            node_rank: Some(1),
            leader_addr: Some("10.0.0.1:7000".into()),
            ..Default::default()
        };
        let r = role(flags, &[("POD_INDEX", "5")], "x-3").unwrap();
        assert_eq!((r.nnodes, r.node_rank), (2, 1));
        assert_eq!(r.leader_addr.as_deref(), Some("10.0.0.1:7000"));
    }

    #[test]
    fn statefulset_pods_find_rank_and_leader_from_identity() {
        let flags = LaunchFlags {
            nnodes: Some(3),
            headless_service: Some("strata-headless".into()),
            ..Default::default()
        };
        let r = role(flags.clone(), &[], "strata-2").unwrap();
        assert_eq!(r.node_rank, 2);
        assert_eq!(
            r.leader_addr.as_deref(),
            Some("strata-0.strata-headless:29500")
        );
        // POD_INDEX wins over the hostname (KAITO sets it from the pod-index label).
        let r = role(flags, &[("POD_INDEX", "1")], "my-set-7").unwrap();
        assert_eq!(r.node_rank, 1);
        assert_eq!(
            r.leader_addr.as_deref(),
            Some("my-set-0.strata-headless:29500")
        );
        let e = role(
            LaunchFlags {
                nnodes: Some(2),
                ..Default::default()
            },
            &[],
            "laptop",
        )
        .unwrap_err();
        assert!(e.to_string().contains("needs this node's rank"), "{e}");
    }

    #[test]
    fn leaderworkerset_environment_is_read() {
        let env = [
            ("LWS_GROUP_SIZE", "4"),
            ("LWS_WORKER_INDEX", "3"),
            ("LWS_LEADER_ADDRESS", "llama-0.llama.default"),
        ];
        let r = role(LaunchFlags::default(), &env, "llama-0-3").unwrap();
        assert_eq!((r.nnodes, r.node_rank), (4, 3));
        assert_eq!(
            r.leader_addr.as_deref(),
            Some("llama-0.llama.default:29500")
        );
        let e = role(LaunchFlags::default(), &[("LWS_GROUP_SIZE", "four")], "h").unwrap_err();
        assert!(
            e.to_string()
                .contains("LWS_GROUP_SIZE=four is not a number"),
            "{e}"
        );
    }

    #[test]
    fn ranks_outside_the_cluster_are_refused() {
        let flags = LaunchFlags {
            nnodes: Some(2),
            node_rank: Some(2),
            leader_addr: Some("h:1".into()),
            ..Default::default()
        };
        assert!(role(flags, &[], "h")
            .unwrap_err()
            .to_string()
            .contains("outside a cluster of 2"));
    }
}
