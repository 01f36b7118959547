//! The scheduler side of the engine: which tokens of which requests run in the
//! next step, and which KV-cache blocks hold them. No tensors, no I/O: every
//! decision here can be unit-tested without a model.

mod block_pool;
mod kv_cache_manager;
mod request;
mod scheduler;
mod spec;

pub use block_pool::{hash_block, BlockHash, BlockPool};
pub use kv_cache_manager::KvCacheManager;
pub use request::{Request, RequestStatus};
pub use scheduler::{RequestUpdate, Scheduler, SchedulerConfig, SchedulerStats};
pub use spec::{ngram_propose, Proposer, SpeculativeConfig};
