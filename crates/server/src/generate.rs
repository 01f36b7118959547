//! Runs the engine requests behind one API call (n choices, several prompts)
//! and gathers or streams their outputs.

use futures::stream::{self, Stream, StreamExt};
use strata_engine::{EngineError, EngineHandle, GenerateRequest, OutputStream, RequestOutput};
use strata_types::{FinishReason, Logprobs, TokenId};

use crate::error::ApiError;
use crate::protocol::Resolved;
use crate::response::Usage;

/// One choice's engine request.
pub struct Choice {
    pub index: usize,
    /// Which prompt it answers (completions take several).
    pub prompt_index: usize,
    rx: OutputStream,
}

/// Starts `n` choices for each prompt. If any is refused the ones already
/// started are dropped, which aborts them.
pub fn start(
    engine: &EngineHandle,
    prompts: &[Vec<TokenId>],
    r: &Resolved,
) -> Result<Vec<Choice>, ApiError> {
    let mut choices = Vec::with_capacity(prompts.len() * r.n);
    for (p, prompt) in prompts.iter().enumerate() {
        for i in 0..r.n {
            let mut sampling = r.sampling.clone();
            sampling.seed = sampling.seed.wrapping_add(i as u64);
            let (_, rx) = engine.generate(GenerateRequest {
                prompt_token_ids: prompt.clone(),
                sampling,
                max_tokens: r.max_tokens,
                stop: r.stop.clone(),
                stop_token_ids: r.stop_token_ids.clone(),
                ignore_eos: r.ignore_eos,
                skip_special_tokens: r.skip_special_tokens,
                guide: r.guide.clone(),
            })?;
            choices.push(Choice {
                index: choices.len(),
                prompt_index: p,
                rx,
            });
        }
    }
    Ok(choices)
}

/// A finished choice.
#[derive(Debug, Default)]
pub struct Finished {
    pub index: usize,
    pub prompt_index: usize,
    pub text: String,
    pub token_ids: Vec<TokenId>,
    pub logprobs: Vec<Logprobs>,
    pub finish: Option<FinishReason>,
    pub usage: Usage,
}

/// Usage of a whole call from `(choice, prompt, usage)`: completions summed,
/// each prompt counted once, from its lowest-numbered choice (later choices
/// of the same prompt find its blocks in the prefix cache).
pub fn total_usage(per_choice: impl Iterator<Item = (usize, usize, Usage)>) -> Usage {
    let mut all: Vec<_> = per_choice.collect();
    all.sort_by_key(|(choice, _, _)| *choice);
    let mut seen = std::collections::HashSet::new();
    let (mut prompt, mut completion, mut cached) = (0, 0, 0);
    for (_, prompt_index, u) in all {
        if seen.insert(prompt_index) {
            prompt += u.prompt_tokens;
            cached += u.prompt_tokens_details.cached_tokens;
        }
        completion += u.completion_tokens;
    }
    Usage::new(prompt, completion, cached)
}

fn usage_of(o: &RequestOutput) -> Usage {
    Usage::new(o.prompt_tokens, o.completion_tokens, o.cached_tokens)
}

/// Waits for every choice to finish.
pub async fn collect(choices: Vec<Choice>) -> Result<Vec<Finished>, ApiError> {
    let futs = choices.into_iter().map(|mut c| async move {
        let mut f = Finished {
            index: c.index,
            prompt_index: c.prompt_index,
            ..Default::default()
        };
        while let Some(o) = c.rx.recv().await {
            let o = o.map_err(ApiError::from)?;
            f.text.push_str(&o.text);
            f.token_ids.extend(&o.token_ids);
            f.logprobs.extend(o.logprobs.iter().cloned());
            f.usage = usage_of(&o);
            if o.finish.is_some() {
                f.finish = o.finish;
                break;
            }
        }
        if f.finish.is_none() {
            return Err(ApiError::from(strata_engine::EngineError::Stopped(
                "the engine dropped the request".into(),
            )));
        }
        Ok(f)
    });
    futures::future::try_join_all(futs).await
}

/// One step's output of one choice, as it arrives.
pub struct Delta {
    pub index: usize,
    pub prompt_index: usize,
    pub output: Result<RequestOutput, EngineError>,
    pub usage: Usage,
}

/// Merges the choices' outputs into one stream, in arrival order. A choice
/// whose channel closes before it finished (the engine stopped) ends with an
/// error item, so a stream never stops silently.
pub fn merge(choices: Vec<Choice>) -> impl Stream<Item = Delta> + Send {
    stream::select_all(choices.into_iter().map(|c| {
        let (index, prompt_index) = (c.index, c.prompt_index);
        stream::unfold(Some(c.rx), move |rx| async move {
            let mut rx = rx?;
            let output = match rx.recv().await {
                Some(o) => o,
                None => Err(EngineError::Stopped(
                    "the engine stopped before this choice finished".into(),
                )),
            };
            let last = !matches!(&output, Ok(o) if o.finish.is_none());
            let delta = Delta {
                index,
                prompt_index,
                usage: output.as_ref().map(usage_of).unwrap_or_default(),
                output,
            };
            Some((delta, (!last).then_some(rx)))
        })
        .boxed()
    }))
}
