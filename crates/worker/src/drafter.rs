//! A draft model on the last stage (speculative decoding's `draft_model`):
//! after each step it catches its own KV cache up with the tokens the step
//! made real, then proposes, greedily, the next tokens of each decoding
//! request. The proposals go back to the leader with the step's tokens, and
//! the scheduler sends them as drafts in the request's next step.
//!
//! Its KV cache is indexed by the target's block ids: the scheduler's blocks
//! (and its prefix cache) cover both models, and it leaves room past each
//! decode for the drafts' own KV. Proposals are argmax tokens, so verifying
//! them by "sample, keep while equal" is exact rejection sampling for a
//! one-hot proposal: the output keeps the target model's distribution.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::DType;
use strata_comm::SingleRank;
use strata_model::{load_whole, BatchInput, KvCache, SeqInfo, StageModel, StageOutput, Weights};
use strata_types::{BlockId, RequestId, TokenId, BLOCK_SIZE};

use crate::runner::RunnerError;
use crate::sampler::argmax;

/// Which draft model to load, and how many tokens it proposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftSpec {
    /// A `.gguf` file or a Hugging Face folder, readable on the node that
    /// runs the last stage.
    pub model: PathBuf,
    pub num_speculative_tokens: usize,
    /// No proposals while a step samples this many requests or more.
    pub disable_by_batch_size: Option<usize>,
}

impl DraftSpec {
    /// Loads the whole draft model, unsharded, on `device` in `dtype`; its
    /// vocabulary must be the target's, token for token.
    pub fn load(
        &self,
        target_vocab: usize,
        device: &candle_core::Device,
        dtype: DType,
        max_positions: usize,
    ) -> Result<Box<dyn StageModel>, RunnerError> {
        let setup = |what: &str, e: &dyn std::fmt::Display| {
            RunnerError::Setup(format!("draft model {}: {what}: {e}", self.model.display()))
        };
        let weights = Weights::open(&self.model, &candle_core::Device::Cpu)
            .map_err(|e| setup("opening it", &e))?;
        let model = load_whole(
            &weights.on(device, dtype),
            Arc::new(SingleRank),
            max_positions,
        )
        .map_err(|e| setup("loading it", &e))?;
        let vocab = model.config().vocab_size;
        if vocab != target_vocab {
            return Err(setup(
                "a draft model must share the model's tokenizer",
                &format!("its vocabulary has {vocab} tokens, the model's {target_vocab}"),
            ));
        }
        Ok(model)
    }
}

/// The draft model, its KV cache and how many tokens it proposes.
pub struct Drafter {
    model: Box<dyn StageModel>,
    kv: KvCache,
    k: usize,
    disable_by_batch_size: Option<usize>,
}

/// One request's work for the drafter this step.
pub struct DraftSeq<'a> {
    pub id: RequestId,
    /// The tokens whose draft KV is missing, at positions `start..`.
    pub tokens: &'a [TokenId],
    pub start: usize,
    pub block_ids: &'a [BlockId],
    /// Whether to propose the tokens that follow `tokens`.
    pub propose: bool,
}

impl Drafter {
    pub fn new(
        model: Box<dyn StageModel>,
        num_blocks: usize,
        kv_dtype: DType,
        spec: &DraftSpec,
    ) -> Result<Self, RunnerError> {
        let kv = model.new_kv_cache_in(num_blocks, kv_dtype)?;
        Ok(Self {
            model,
            kv,
            k: spec.num_speculative_tokens,
            disable_by_batch_size: spec.disable_by_batch_size,
        })
    }

    /// How many tokens the draft model can propose after `end` tokens of a
    /// sequence with `num_blocks` blocks: each proposal but the last is fed
    /// back at the next position, whose KV needs a slot.
    fn room(&self, end: usize, num_blocks: usize) -> usize {
        let slots = (num_blocks * BLOCK_SIZE).min(self.model.max_positions());
        self.k.min((slots + 1).saturating_sub(end))
    }

    /// Computes the draft KV of every sequence's `tokens` in one pass, then
    /// proposes up to `k` tokens for those that ask, one pass per token.
    /// Returns the proposals, in `seqs`' order.
    pub fn step(
        &mut self,
        seqs: &[DraftSeq],
    ) -> Result<Vec<(RequestId, Vec<TokenId>)>, RunnerError> {
        let asking = seqs.iter().filter(|s| s.propose).count();
        let proposing = asking > 0 && self.disable_by_batch_size.is_none_or(|b| asking < b);
        // (index in seqs, proposals so far, how many it may get)
        let mut drafts: Vec<(usize, Vec<TokenId>, usize)> = Vec::new();
        let mut token_ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut logits_indices = Vec::new();
        let mut infos = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                continue;
            }
            let end = s.start + s.tokens.len();
            token_ids.extend_from_slice(s.tokens);
            for p in s.start..end {
                positions.push(p as u32);
                slots.push(slot(s.block_ids, p));
            }
            infos.push(SeqInfo {
                query_len: s.tokens.len(),
                block_table: s.block_ids,
            });
            let room = self.room(end, s.block_ids.len());
            if proposing && s.propose && room > 0 {
                logits_indices.push(token_ids.len() as u32 - 1);
                drafts.push((i, Vec::with_capacity(room), room));
            }
        }
        if token_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut next = self.forward(&token_ids, &positions, &slots, &infos, &logits_indices)?;
        for round in 1.. {
            for (d, t) in drafts.iter_mut().zip(&next) {
                d.1.push(*t);
            }
            // Feed each last proposal back, at the position after it.
            let (mut token_ids, mut positions, mut slots, mut infos) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (i, d, room) in &drafts {
                if *room > round {
                    let s = &seqs[*i];
                    let p = s.start + s.tokens.len() + round - 1;
                    token_ids.push(*d.last().expect("one proposal per round"));
                    positions.push(p as u32);
                    slots.push(slot(s.block_ids, p));
                    infos.push(SeqInfo {
                        query_len: 1,
                        block_table: s.block_ids,
                    });
                }
            }
            if token_ids.is_empty() {
                break;
            }
            drafts.retain(|(_, _, room)| *room > round);
            let rows: Vec<u32> = (0..token_ids.len() as u32).collect();
            next = self.forward(&token_ids, &positions, &slots, &infos, &rows)?;
        }
        Ok(drafts
            .into_iter()
            .map(|(i, d, _)| (seqs[i].id, d))
            .collect())
    }

    /// One forward pass; the argmax token of each row in `logits_indices`.
    fn forward(
        &mut self,
        token_ids: &[TokenId],
        positions: &[u32],
        slots: &[u32],
        seqs: &[SeqInfo],
        logits_indices: &[u32],
    ) -> Result<Vec<TokenId>, RunnerError> {
        let input = BatchInput {
            token_ids,
            positions,
            slot_mapping: slots,
            seqs,
            logits_indices,
        };
        let StageOutput::Logits(logits) = self.model.forward(&input, None, &mut self.kv)? else {
            unreachable!("the draft model is a whole model, so its last stage")
        };
        if logits_indices.is_empty() {
            return Ok(Vec::new());
        }
        let vocab = logits.dim(1)?;
        let logits = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Greedy, as the sampler picks: ties go to the lowest id.
        Ok(logits.chunks(vocab).map(argmax).collect())
    }
}

fn slot(block_ids: &[BlockId], p: usize) -> u32 {
    block_ids[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32
}
