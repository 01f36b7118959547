//! The leader <-> worker protocol, generated from `proto/strata.proto`, and
//! lossless conversions between its step messages and `strata-types`.

pub mod v1 {
    tonic::include_proto!("strata.v1");
}

use strata_types as t;
use v1 as p;

/// The metadata entry that carries the cluster token on every call.
pub const TOKEN_METADATA: &str = "x-strata-cluster-token";

impl From<&t::SamplingParams> for p::SamplingParams {
    fn from(s: &t::SamplingParams) -> Self {
        Self {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k as u32,
            min_p: s.min_p,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
            logprobs: s.logprobs.map(|n| n as u32),
            logit_bias: s
                .logit_bias
                .iter()
                .map(|&(token_id, bias)| p::LogitBias { token_id, bias })
                .collect(),
            allowed_token_ids: s
                .allowed_token_ids
                .as_ref()
                .map(|ids| p::TokenList { ids: ids.clone() }),
            bad_words: s
                .bad_words
                .iter()
                .map(|ids| p::TokenList { ids: ids.clone() })
                .collect(),
            min_tokens: s.min_tokens as u32,
            stop_token_ids: s.stop_token_ids.clone(),
        }
    }
}

impl From<p::SamplingParams> for t::SamplingParams {
    fn from(s: p::SamplingParams) -> Self {
        Self {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k as usize,
            min_p: s.min_p,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
            logprobs: s.logprobs.map(|n| n as usize),
            logit_bias: s
                .logit_bias
                .into_iter()
                .map(|b| (b.token_id, b.bias))
                .collect(),
            allowed_token_ids: s.allowed_token_ids.map(|l| l.ids),
            bad_words: s.bad_words.into_iter().map(|l| l.ids).collect(),
            min_tokens: s.min_tokens as usize,
            stop_token_ids: s.stop_token_ids,
        }
    }
}

impl From<&t::SchedulerOutput> for p::SchedulerOutput {
    fn from(o: &t::SchedulerOutput) -> Self {
        Self {
            step_id: o.step_id,
            scheduled_new_reqs: o
                .scheduled_new_reqs
                .iter()
                .map(|r| p::NewRequestData {
                    req_id: r.req_id,
                    token_ids: r.token_ids.clone(),
                    num_prompt_tokens: r.num_prompt_tokens as u32,
                    sampling: Some((&r.sampling).into()),
                    block_ids: r.block_ids.clone(),
                    num_computed_tokens: r.num_computed_tokens as u32,
                })
                .collect(),
            scheduled_cached_reqs: o
                .scheduled_cached_reqs
                .iter()
                .map(|r| p::CachedRequestData {
                    req_id: r.req_id,
                    new_token_ids: r.new_token_ids.clone(),
                    new_block_ids: r.new_block_ids.clone(),
                    num_computed_tokens: r.num_computed_tokens as u32,
                })
                .collect(),
            num_scheduled_tokens: o
                .num_scheduled_tokens
                .iter()
                .map(|&(req_id, n)| p::ScheduledTokens {
                    req_id,
                    num_tokens: n as u32,
                })
                .collect(),
            total_num_scheduled_tokens: o.total_num_scheduled_tokens as u32,
            finished_req_ids: o.finished_req_ids.clone(),
            structured_req_ids: o.structured_req_ids.clone(),
            scheduled_spec_decode_tokens: o
                .scheduled_spec_decode_tokens
                .iter()
                .map(|(req_id, ids)| p::SpecDecodeTokens {
                    req_id: *req_id,
                    token_ids: ids.clone(),
                })
                .collect(),
        }
    }
}

impl From<p::SchedulerOutput> for t::SchedulerOutput {
    fn from(o: p::SchedulerOutput) -> Self {
        Self {
            step_id: o.step_id,
            scheduled_new_reqs: o
                .scheduled_new_reqs
                .into_iter()
                .map(|r| t::NewRequestData {
                    req_id: r.req_id,
                    token_ids: r.token_ids,
                    num_prompt_tokens: r.num_prompt_tokens as usize,
                    sampling: r.sampling.map(Into::into).unwrap_or_default(),
                    block_ids: r.block_ids,
                    num_computed_tokens: r.num_computed_tokens as usize,
                })
                .collect(),
            scheduled_cached_reqs: o
                .scheduled_cached_reqs
                .into_iter()
                .map(|r| t::CachedRequestData {
                    req_id: r.req_id,
                    new_token_ids: r.new_token_ids,
                    new_block_ids: r.new_block_ids,
                    num_computed_tokens: r.num_computed_tokens as usize,
                })
                .collect(),
            num_scheduled_tokens: o
                .num_scheduled_tokens
                .into_iter()
                .map(|s| (s.req_id, s.num_tokens as usize))
                .collect(),
            total_num_scheduled_tokens: o.total_num_scheduled_tokens as usize,
            finished_req_ids: o.finished_req_ids,
            structured_req_ids: o.structured_req_ids,
            scheduled_spec_decode_tokens: o
                .scheduled_spec_decode_tokens
                .into_iter()
                .map(|s| (s.req_id, s.token_ids))
                .collect(),
        }
    }
}

impl From<&t::StepMasks> for p::StepMasks {
    fn from(m: &t::StepMasks) -> Self {
        Self {
            step_id: m.step_id,
            masks: m
                .masks
                .iter()
                .map(|(req_id, mask)| p::RequestMask {
                    req_id: *req_id,
                    words: mask.words().to_vec(),
                })
                .collect(),
        }
    }
}

impl From<p::StepMasks> for t::StepMasks {
    fn from(m: p::StepMasks) -> Self {
        Self {
            step_id: m.step_id,
            masks: m
                .masks
                .into_iter()
                .map(|r| (r.req_id, t::TokenMask::from_words(r.words)))
                .collect(),
        }
    }
}

impl From<&t::StepResult> for p::StepResult {
    fn from(r: &t::StepResult) -> Self {
        Self {
            step_id: r.step_id,
            sampled: r
                .sampled
                .iter()
                .map(|s| p::SampledToken {
                    req_id: s.req_id,
                    token_id: s.token_id,
                    logprobs: s.logprobs.as_ref().map(|l| p::Logprobs {
                        logprob: l.logprob,
                        top: l
                            .top
                            .iter()
                            .map(|&(token_id, logprob)| p::TopLogprob { token_id, logprob })
                            .collect(),
                    }),
                })
                .collect(),
            draft_token_ids: r
                .draft_token_ids
                .iter()
                .map(|(req_id, ids)| p::SpecDecodeTokens {
                    req_id: *req_id,
                    token_ids: ids.clone(),
                })
                .collect(),
        }
    }
}

impl From<p::StepResult> for t::StepResult {
    fn from(r: p::StepResult) -> Self {
        Self {
            step_id: r.step_id,
            sampled: r
                .sampled
                .into_iter()
                .map(|s| t::SampledToken {
                    req_id: s.req_id,
                    token_id: s.token_id,
                    logprobs: s.logprobs.map(|l| t::Logprobs {
                        logprob: l.logprob,
                        top: l.top.into_iter().map(|x| (x.token_id, x.logprob)).collect(),
                    }),
                })
                .collect(),
            draft_token_ids: r
                .draft_token_ids
                .into_iter()
                .map(|s| (s.req_id, s.token_ids))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_messages_survive_the_wire() {
        let out = t::SchedulerOutput {
            step_id: 7,
            scheduled_new_reqs: vec![t::NewRequestData {
                req_id: 3,
                token_ids: vec![1, 2, 3, 40_000],
                num_prompt_tokens: 3,
                sampling: t::SamplingParams {
                    temperature: 0.7,
                    top_k: 20,
                    seed: u64::MAX,
                    logprobs: Some(5),
                    logit_bias: vec![(5, -100.0), (9, 2.5)],
                    allowed_token_ids: Some(vec![]),
                    bad_words: vec![vec![1, 2], vec![3]],
                    min_tokens: 4,
                    stop_token_ids: vec![0, 2],
                    ..Default::default()
                },
                block_ids: vec![9, 4],
                num_computed_tokens: 16,
            }],
            scheduled_cached_reqs: vec![t::CachedRequestData {
                req_id: 1,
                new_token_ids: vec![77],
                new_block_ids: vec![],
                num_computed_tokens: 33,
            }],
            num_scheduled_tokens: vec![(3, 4), (1, 3)],
            total_num_scheduled_tokens: 7,
            finished_req_ids: vec![2],
            structured_req_ids: vec![3],
            scheduled_spec_decode_tokens: vec![(1, vec![8, 9])],
        };
        let wire = prost::Message::encode_to_vec(&p::SchedulerOutput::from(&out));
        let back: p::SchedulerOutput = prost::Message::decode(wire.as_slice()).unwrap();
        assert_eq!(t::SchedulerOutput::from(back), out);

        let res = t::StepResult {
            step_id: 7,
            sampled: vec![
                t::SampledToken {
                    req_id: 3,
                    token_id: 11,
                    logprobs: Some(t::Logprobs {
                        logprob: -0.25,
                        top: vec![(11, -0.25), (12, -2.0)],
                    }),
                },
                t::SampledToken {
                    req_id: 1,
                    token_id: 5,
                    logprobs: None,
                },
            ],
            draft_token_ids: vec![(3, vec![12, 13]), (1, vec![])],
        };
        let wire = prost::Message::encode_to_vec(&p::StepResult::from(&res));
        let back: p::StepResult = prost::Message::decode(wire.as_slice()).unwrap();
        assert_eq!(t::StepResult::from(back), res);

        let masks = t::StepMasks {
            step_id: 7,
            masks: vec![(3, t::TokenMask::from_words(vec![u32::MAX, 0, 5]))],
        };
        let wire = prost::Message::encode_to_vec(&p::StepMasks::from(&masks));
        let back: p::StepMasks = prost::Message::decode(wire.as_slice()).unwrap();
        assert_eq!(t::StepMasks::from(back), masks);
    }
}

/// Attaches the cluster token to every call a client makes.
#[derive(Clone)]
pub struct AddToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl AddToken {
    /// `token` must be printable ASCII (it travels as gRPC metadata).
    pub fn new(token: &str) -> Result<Self, String> {
        if token.is_empty() {
            return Ok(Self(None));
        }
        token
            .parse()
            .map(|v| Self(Some(v)))
            .map_err(|_| "the cluster token must be printable ASCII".to_string())
    }
}

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(TOKEN_METADATA, v.clone());
        }
        Ok(req)
    }
}

/// Refuses calls without the cluster token (when the cluster has one).
#[derive(Clone)]
pub struct CheckToken(std::sync::Arc<str>);

impl CheckToken {
    pub fn new(token: &str) -> Self {
        Self(token.into())
    }
}

impl tonic::service::Interceptor for CheckToken {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.0.is_empty() {
            return Ok(req);
        }
        let given = req.metadata().get(TOKEN_METADATA).map(|v| v.as_bytes());
        let ok = given.is_some_and(|g| {
            g.len() == self.0.len()
                && g.iter()
                    .zip(self.0.as_bytes())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    == 0
        });
        if ok {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated(
                "wrong or missing cluster token (--cluster-token / STRATA_CLUSTER_TOKEN)",
            ))
        }
    }
}

/// The version every node must share: they exchange step messages and
/// activation frames whose shapes this build defines.
pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");

impl From<&t::StageSlot> for p::StageSlot {
    fn from(s: &t::StageSlot) -> Self {
        Self {
            stage: s.stage as u32,
            first_layer: s.layers.start as u32,
            end_layer: s.layers.end as u32,
            tp_size: s.tp_size as u32,
            tp_rank_begin: s.tp_rank_begin as u32,
            tp_rank_count: s.tp_rank_count as u32,
        }
    }
}

impl TryFrom<&p::StageSlot> for t::StageSlot {
    type Error = String;
    fn try_from(s: &p::StageSlot) -> Result<Self, String> {
        if s.first_layer >= s.end_layer
            || s.tp_size == 0
            || s.tp_rank_count == 0
            || s.tp_rank_begin + s.tp_rank_count > s.tp_size
        {
            return Err(format!("invalid stage slot {s:?}"));
        }
        Ok(Self {
            stage: s.stage as usize,
            layers: t::LayerRange::new(s.first_layer as usize, s.end_layer as usize),
            tp_size: s.tp_size as usize,
            tp_rank_begin: s.tp_rank_begin as usize,
            tp_rank_count: s.tp_rank_count as usize,
        })
    }
}
