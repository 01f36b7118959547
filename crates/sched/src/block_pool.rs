//! Physical KV blocks: reference counts, an LRU free queue and the prefix cache.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use strata_types::{BlockId, TokenId};

/// Identifies the content of a full block *and everything before it*:
/// `hash(parent hash, block tokens)`, so equal hashes mean equal prefixes.
pub type BlockHash = u64;

/// Chains a block's tokens onto its parent's hash.
pub fn hash_block(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
    // SipHash with fixed zero keys: the same on every run of the same build.
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Owns every block of the cache. A block is either in use (ref count > 0) or
/// in the free queue; a free block may still hold a cached prefix, which stays
/// reusable until the block is handed out again (least recently freed first).
#[derive(Debug)]
pub struct BlockPool {
    ref_cnt: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    /// Free blocks in eviction order, keyed by a increasing counter.
    free: BTreeMap<u64, BlockId>,
    free_key: Vec<Option<u64>>,
    next_key: u64,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        let mut pool = Self {
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            free: BTreeMap::new(),
            free_key: vec![None; num_blocks],
            next_key: 0,
            cached: HashMap::new(),
        };
        for b in 0..num_blocks {
            pool.push_free(b as BlockId);
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// A cached block holding exactly this prefix, if any.
    pub fn lookup(&self, hash: BlockHash) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_cnt[block as usize]
    }

    /// Takes `n` blocks off the free queue, evicting their cached content.
    pub fn get_new_blocks(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, b) = self.free.pop_first().expect("checked length");
            let i = b as usize;
            self.free_key[i] = None;
            if let Some(h) = self.hash[i].take() {
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                }
            }
            self.ref_cnt[i] = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Shares already-cached blocks with one more request.
    pub fn touch(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            let i = b as usize;
            if self.ref_cnt[i] == 0 {
                let key = self.free_key[i]
                    .take()
                    .expect("a free block has a queue key");
                self.free.remove(&key);
            }
            self.ref_cnt[i] += 1;
        }
    }

    /// Drops one reference from each block; blocks that reach zero join the
    /// free queue in the given order (pass the tail of a sequence first, so its
    /// least shareable blocks are evicted first).
    pub fn free_blocks(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for b in blocks {
            let i = b as usize;
            assert!(self.ref_cnt[i] > 0, "block {b} freed twice");
            self.ref_cnt[i] -= 1;
            if self.ref_cnt[i] == 0 {
                self.push_free(b);
            }
        }
    }

    /// Records that `block` now holds the full prefix `hash`.
    pub fn cache_block(&mut self, block: BlockId, hash: BlockHash) {
        let i = block as usize;
        if self.hash[i].is_some() {
            return;
        }
        // Two requests may compute the same prefix at once; the first stays the
        // canonical copy and the other block is simply not shared.
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            self.hash[i] = Some(hash);
        }
    }

    /// Forgets every cached prefix (blocks in use stay allocated).
    pub fn reset_prefix_cache(&mut self) {
        self.cached.clear();
        self.hash.iter_mut().for_each(|h| *h = None);
    }

    fn push_free(&mut self, b: BlockId) {
        let key = self.next_key;
        self.next_key += 1;
        self.free.insert(key, b);
        self.free_key[b as usize] = Some(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chained_hashes_depend_on_the_whole_prefix() {
        let a = hash_block(None, &[1, 2, 3]);
        let b = hash_block(None, &[1, 2, 4]);
        assert_ne!(a, b);
        assert_eq!(hash_block(Some(a), &[5]), hash_block(Some(a), &[5]));
        assert_ne!(hash_block(Some(a), &[5]), hash_block(Some(b), &[5]));
    }

    #[test]
    fn free_blocks_are_reused_least_recently_freed_first() {
        let mut pool = BlockPool::new(4);
        let got = pool.get_new_blocks(4).unwrap();
        assert_eq!(pool.num_free(), 0);
        assert!(pool.get_new_blocks(1).is_none());
        pool.free_blocks([got[2], got[0]]);
        assert_eq!(pool.get_new_blocks(1).unwrap(), vec![got[2]]);
        assert_eq!(pool.get_new_blocks(1).unwrap(), vec![got[0]]);
    }

    #[test]
    fn a_cached_free_block_can_be_revived_until_evicted() {
        let mut pool = BlockPool::new(2);
        let b = pool.get_new_blocks(1).unwrap()[0];
        let h = hash_block(None, &[7; 16]);
        pool.cache_block(b, h);
        pool.free_blocks([b]);
        assert_eq!(pool.lookup(h), Some(b));
        pool.touch(&[b]);
        assert_eq!(pool.ref_count(b), 1);
        assert_eq!(pool.num_free(), 1);
        pool.free_blocks([b]);
        // Taking both blocks evicts the cached one.
        pool.get_new_blocks(2).unwrap();
        assert_eq!(pool.lookup(h), None);
    }

    #[test]
    fn shared_blocks_are_freed_only_by_the_last_owner() {
        let mut pool = BlockPool::new(1);
        let b = pool.get_new_blocks(1).unwrap()[0];
        pool.touch(&[b]);
        pool.free_blocks([b]);
        assert_eq!(pool.num_free(), 0);
        pool.free_blocks([b]);
        assert_eq!(pool.num_free(), 1);
    }
}
