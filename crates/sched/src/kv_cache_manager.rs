//! Maps requests to the blocks that hold their KV, with prefix caching.

use std::collections::HashMap;

use strata_types::{BlockId, RequestId, TokenId, BLOCK_SIZE};

use crate::block_pool::{hash_block, BlockHash, BlockPool};

#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    enable_prefix_caching: bool,
    req_blocks: HashMap<RequestId, Vec<BlockId>>,
    /// Hashes of the request's full blocks, computed once each.
    req_hashes: HashMap<RequestId, Vec<BlockHash>>,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, enable_prefix_caching: bool) -> Self {
        Self {
            pool: BlockPool::new(num_blocks),
            enable_prefix_caching,
            req_blocks: HashMap::new(),
            req_hashes: HashMap::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    pub fn blocks(&self, req: RequestId) -> &[BlockId] {
        self.req_blocks.get(&req).map_or(&[], Vec::as_slice)
    }

    /// The longest run of cached full blocks at the start of `tokens`. At least
    /// one token is always left to compute, since sampling needs its logits.
    pub fn get_computed_blocks(
        &mut self,
        req: RequestId,
        tokens: &[TokenId],
    ) -> (Vec<BlockId>, usize) {
        if !self.enable_prefix_caching || tokens.is_empty() {
            return (Vec::new(), 0);
        }
        self.update_hashes(req, tokens);
        let max_blocks = (tokens.len() - 1) / BLOCK_SIZE;
        let hits: Vec<BlockId> = self.req_hashes[&req]
            .iter()
            .take(max_blocks)
            .map_while(|h| self.pool.lookup(*h))
            .collect();
        let n = hits.len() * BLOCK_SIZE;
        (hits, n)
    }

    /// Makes room for `num_new` more tokens after `num_computed`, first
    /// adopting `computed_blocks` (prefix hits from [`Self::get_computed_blocks`]).
    /// Returns the blocks added to the request, or `None` (and changes nothing)
    /// when the pool is too small.
    pub fn allocate_slots(
        &mut self,
        req: RequestId,
        tokens: &[TokenId],
        num_computed: usize,
        num_new: usize,
        computed_blocks: &[BlockId],
    ) -> Option<Vec<BlockId>> {
        let have = self.blocks(req).len() + computed_blocks.len();
        let need = (num_computed + num_new).div_ceil(BLOCK_SIZE);
        let fresh = need.saturating_sub(have);
        // Reviving a cached block that sits in the free queue uses up a free block.
        let revived = computed_blocks
            .iter()
            .filter(|b| self.pool.ref_count(**b) == 0)
            .count();
        if fresh + revived > self.pool.num_free() {
            return None;
        }
        self.pool.touch(computed_blocks);
        let new = self.pool.get_new_blocks(fresh).expect("checked free count");
        let blocks = self.req_blocks.entry(req).or_default();
        blocks.extend_from_slice(computed_blocks);
        blocks.extend_from_slice(&new);
        let added = [computed_blocks, &new].concat();
        if self.enable_prefix_caching {
            // Blocks that are full once this step has run become shareable.
            let full = ((num_computed + num_new).min(tokens.len())) / BLOCK_SIZE;
            self.update_hashes(req, tokens);
            let hashes = &self.req_hashes[&req];
            let blocks = &self.req_blocks[&req];
            for i in 0..full.min(hashes.len()) {
                self.pool.cache_block(blocks[i], hashes[i]);
            }
        }
        Some(added)
    }

    /// Forgets every cached prefix.
    pub fn reset_prefix_cache(&mut self) {
        self.pool.reset_prefix_cache();
    }

    /// Releases the request's blocks; cached ones stay reusable until evicted.
    pub fn free(&mut self, req: RequestId) {
        if let Some(blocks) = self.req_blocks.remove(&req) {
            self.pool.free_blocks(blocks.into_iter().rev());
        }
    }

    /// Forgets the request entirely (also its hashes).
    pub fn remove(&mut self, req: RequestId) {
        self.free(req);
        self.req_hashes.remove(&req);
    }

    fn update_hashes(&mut self, req: RequestId, tokens: &[TokenId]) {
        let hashes = self.req_hashes.entry(req).or_default();
        let full = tokens.len() / BLOCK_SIZE;
        for i in hashes.len()..full {
            let parent = i.checked_sub(1).map(|p| hashes[p]);
            hashes.push(hash_block(
                parent,
                &tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE],
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<TokenId> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn allocation_rounds_up_to_blocks_and_fails_cleanly() {
        let mut kv = KvCacheManager::new(3, true);
        let t = toks(40, 0);
        assert_eq!(kv.allocate_slots(1, &t, 0, 17, &[]).unwrap().len(), 2);
        assert_eq!(kv.allocate_slots(1, &t, 17, 15, &[]).unwrap().len(), 0);
        assert!(kv.allocate_slots(1, &t, 32, 20, &[]).is_none());
        assert_eq!(kv.blocks(1).len(), 2, "a failed allocation changes nothing");
        assert_eq!(kv.allocate_slots(1, &t, 32, 8, &[]).unwrap().len(), 1);
    }

    #[test]
    fn a_shared_prefix_is_found_block_by_block() {
        let mut kv = KvCacheManager::new(10, true);
        let a = toks(40, 0);
        kv.allocate_slots(1, &a, 0, 40, &[]).unwrap();
        // Same first 32 tokens, different after.
        let mut b = a[..32].to_vec();
        b.extend(toks(10, 1000));
        let (hits, n) = kv.get_computed_blocks(2, &b);
        assert_eq!(n, 32);
        assert_eq!(hits, kv.blocks(1)[..2].to_vec());
        // A differing first block shares nothing.
        let (hits, n) = kv.get_computed_blocks(3, &toks(40, 5));
        assert_eq!((hits.len(), n), (0, 0));
    }

    #[test]
    fn a_fully_cached_prompt_still_computes_its_last_token() {
        let mut kv = KvCacheManager::new(10, true);
        let a = toks(32, 0);
        kv.allocate_slots(1, &a, 0, 32, &[]).unwrap();
        let (_, n) = kv.get_computed_blocks(2, &a);
        assert_eq!(n, 16);
    }

    #[test]
    fn freed_prefixes_survive_until_their_blocks_are_needed() {
        let mut kv = KvCacheManager::new(4, true);
        let a = toks(33, 0);
        kv.allocate_slots(1, &a, 0, 33, &[]).unwrap();
        kv.remove(1);
        assert_eq!(kv.num_free_blocks(), 4);
        let (hits, n) = kv.get_computed_blocks(2, &a);
        assert_eq!(n, 32);
        kv.allocate_slots(2, &a, n, 1, &hits).unwrap();
        assert_eq!(kv.num_free_blocks(), 1);
        kv.remove(2);
        // A request that needs every block evicts the cached ones.
        kv.allocate_slots(3, &toks(64, 9), 0, 64, &[]).unwrap();
        assert_eq!(kv.get_computed_blocks(4, &a).1, 0);
    }

    #[test]
    fn disabled_prefix_caching_never_hits() {
        let mut kv = KvCacheManager::new(4, false);
        let a = toks(33, 0);
        kv.allocate_slots(1, &a, 0, 33, &[]).unwrap();
        assert_eq!(kv.get_computed_blocks(2, &a).1, 0);
    }
}
