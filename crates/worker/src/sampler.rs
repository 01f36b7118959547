//! Logits → token, with OpenAI/vLLM semantics for every knob.

use rand::{Rng, SeedableRng};
use strata_types::{Logprobs, SamplingParams, TokenId, TokenMask};

/// Tokens more than this many nats (after temperature) below the best cannot
/// change the outcome in f32 (relative weight < 1e-13), so they are dropped
/// before sorting.
const NEGLIGIBLE_NATS: f32 = 30.0;

/// Picks the next token from one row of logits (modified in place).
///
/// `history` is the prompt followed by the output so far; `num_prompt` says
/// where the output starts; `mask`, a structured output's allowed tokens.
/// Logprobs come from the raw logits, before penalties, logit rules, the
/// mask and temperature (vLLM's default). The random draw depends only
/// on the seed and the output position, so a request recomputed after
/// preemption samples exactly what it would have.
pub fn sample(
    logits: &mut [f32],
    params: &SamplingParams,
    history: &[TokenId],
    num_prompt: usize,
    mask: Option<&TokenMask>,
) -> (TokenId, Option<Logprobs>) {
    // A NaN (an overflow upstream) must not poison the choice.
    for l in logits.iter_mut() {
        if l.is_nan() {
            *l = f32::NEG_INFINITY;
        }
    }
    // The rest changes `logits`; keep the raw row only when logprobs are asked for.
    let changes = params.has_penalties() || params.has_logit_rules() || mask.is_some();
    let raw = params.logprobs.map(|n| {
        let (lse, top) = top_logprobs(logits, n);
        (lse, top, changes.then(|| logits.to_vec()))
    });
    apply_penalties(logits, params, history, num_prompt);
    apply_logit_rules(logits, params, &history[num_prompt..]);
    if let Some(mask) = mask {
        mask.apply(logits);
    }
    let token = if params.is_greedy() {
        argmax(logits)
    } else {
        let step = (history.len() - num_prompt) as u64;
        draw(logits, params, step)
    };
    let logprobs = raw.map(|(lse, top, copy)| Logprobs {
        logprob: copy.as_deref().unwrap_or(logits)[token as usize] - lse,
        top: top.into_iter().map(|(t, l)| (t, l - lse)).collect(),
    });
    (token, logprobs)
}

/// `(logsumexp, the n largest (token, logit))` of a row.
fn top_logprobs(logits: &[f32], n: usize) -> (f32, Vec<(TokenId, f32)>) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by_logit);
    }
    idx.truncate(n);
    idx.sort_by(by_logit);
    (
        lse,
        idx.into_iter().map(|t| (t, logits[t as usize])).collect(),
    )
}

fn apply_penalties(logits: &mut [f32], p: &SamplingParams, history: &[TokenId], num_prompt: usize) {
    if !p.has_penalties() {
        return;
    }
    if p.repetition_penalty != 1.0 {
        // HF/vLLM: over prompt and output, divide positive logits, multiply negative.
        let mut seen = vec![false; logits.len()];
        for &t in history {
            let t = t as usize;
            if t < logits.len() && !seen[t] {
                seen[t] = true;
                let l = &mut logits[t];
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        // OpenAI: over the output only.
        let mut counts = std::collections::HashMap::<TokenId, u32>::new();
        for &t in &history[num_prompt..] {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }
}

/// `logit_bias`, `allowed_token_ids`, `bad_words` and `min_tokens`.
fn apply_logit_rules(logits: &mut [f32], p: &SamplingParams, output: &[TokenId]) {
    if !p.has_logit_rules() {
        return;
    }
    for &(t, bias) in &p.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += bias;
        }
    }
    let mut ban = |t: TokenId| {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    };
    for words in &p.bad_words {
        if let Some((&last, prefix)) = words.split_last() {
            if output.ends_with(prefix) {
                ban(last);
            }
        }
    }
    if output.len() < p.min_tokens {
        p.stop_token_ids.iter().for_each(|&t| ban(t));
    }
    if let Some(allowed) = &p.allowed_token_ids {
        let mut keep = vec![false; logits.len()];
        for &t in allowed {
            if let Some(k) = keep.get_mut(t as usize) {
                *k = true;
            }
        }
        for (l, k) in logits.iter_mut().zip(keep) {
            if !k {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// The first index of the largest logit, NaN counting as -inf: the rule the
/// kernels' `argmax_rows` follows on any device.
pub(crate) fn argmax(logits: &[f32]) -> TokenId {
    strata_kernels::reference::argmax(logits)
}

/// Temperature, then top-k, top-p and min-p on the survivors, then one draw.
fn draw(logits: &[f32], p: &SamplingParams, step: u64) -> TokenId {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if max.is_infinite() {
        // +inf: that token is certain; all -inf: nothing to choose between.
        return argmax(logits);
    }
    let t = p.temperature;
    let mut cand: Vec<(TokenId, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| (max - **l) / t < NEGLIGIBLE_NATS)
        .map(|(i, l)| (i as TokenId, (l - max) / t))
        .collect();
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 {
        cand.truncate(p.top_k);
    }
    let mut probs: Vec<f32> = cand.iter().map(|(_, l)| l.exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        for (i, x) in probs.iter().enumerate() {
            acc += x;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let floor = p.min_p * probs[0];
        keep = keep.min(probs.iter().take_while(|x| **x >= floor).count().max(1));
    }
    let probs = &probs[..keep];
    let total: f32 = probs.iter().sum();
    let mut rng = rand::rngs::StdRng::seed_from_u64(mix(p.seed, step));
    let mut u = rng.random::<f32>() * total;
    for (i, x) in probs.iter().enumerate() {
        if u < *x {
            return cand[i].0;
        }
        u -= x;
    }
    cand[keep - 1].0
}

/// SplitMix64 of (seed, step): independent streams per output position.
fn mix(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            seed: 7,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_raw_logprobs() {
        let mut l = vec![0.0, 3.0, 1.0, 2.0];
        let p = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let (t, lp) = sample(&mut l, &p, &[0], 1, None);
        assert_eq!(t, 1);
        let lp = lp.unwrap();
        let lse = (0f32.exp() + 3f32.exp() + 1f32.exp() + 2f32.exp()).ln();
        assert!((lp.logprob - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn the_same_seed_and_position_draw_the_same_token() {
        let row: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draws = |seed: u64| -> Vec<u32> {
            (0..20)
                .map(|pos| {
                    let hist: Vec<u32> = (0..pos + 1).collect();
                    sample(
                        &mut row.clone(),
                        &SamplingParams { seed, ..params() },
                        &hist,
                        1,
                        None,
                    )
                    .0
                })
                .collect()
        };
        assert_eq!(draws(1), draws(1));
        assert_ne!(draws(1), draws(2));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let row = vec![0.1, 0.5, 2.0, 1.9];
        for p in [
            SamplingParams {
                top_k: 1,
                ..params()
            },
            SamplingParams {
                top_p: 0.01,
                ..params()
            },
            SamplingParams {
                min_p: 0.99,
                ..params()
            },
        ] {
            for seed in 0..20 {
                let p = SamplingParams { seed, ..p.clone() };
                assert_eq!(sample(&mut row.clone(), &p, &[0], 1, None).0, 2);
            }
        }
    }

    #[test]
    fn top_k_never_picks_outside_the_k_best() {
        let row: Vec<f32> = (0..50).map(|i| i as f32 * 0.01).collect();
        for seed in 0..200 {
            let p = SamplingParams {
                top_k: 3,
                temperature: 5.0,
                seed,
                ..params()
            };
            assert!(sample(&mut row.clone(), &p, &[0], 1, None).0 >= 47);
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        // Token 0 leads narrowly but was already generated twice.
        let row = vec![1.0, 0.9, 0.0];
        let hist = [2, 0, 0];
        for p in [
            SamplingParams {
                frequency_penalty: 0.1,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                presence_penalty: 0.2,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                repetition_penalty: 1.2,
                ..SamplingParams::greedy()
            },
        ] {
            assert_eq!(sample(&mut row.clone(), &p, &hist, 1, None).0, 1, "{p:?}");
        }
        // Without penalties the leader wins.
        assert_eq!(
            sample(&mut row.clone(), &SamplingParams::greedy(), &hist, 1, None).0,
            0
        );
    }

    #[test]
    fn non_finite_logits_never_panic() {
        let p = SamplingParams {
            min_p: 0.1,
            top_p: 0.9,
            ..params()
        };
        assert_eq!(sample(&mut [f32::NEG_INFINITY; 4], &p, &[0], 1, None).0, 0);
        assert_eq!(
            sample(&mut [0.0, f32::INFINITY, 1.0], &p, &[0], 1, None).0,
            1
        );
        assert_eq!(
            sample(&mut [f32::NAN, 2.0, f32::NAN], &p, &[0], 1, None).0,
            1
        );
        let g = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        assert_eq!(sample(&mut [f32::NAN, 1.0, 0.5], &g, &[0], 1, None).0, 1);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25]
        let row = vec![3f32.ln(), 0.0];
        let n = 4000;
        let zeros = (0..n)
            .filter(|&s| {
                sample(
                    &mut row.clone(),
                    &SamplingParams {
                        seed: s,
                        ..params()
                    },
                    &[0],
                    1,
                    None,
                )
                .0 == 0
            })
            .count();
        let frac = zeros as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }

    #[test]
    fn logit_rules_bias_allow_and_ban() {
        let row = vec![1.0, 0.5, 0.0, -1.0];
        let greedy =
            |p: SamplingParams, hist: &[u32]| sample(&mut row.clone(), &p, hist, 1, None).0;
        let with = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::greedy();
            f(&mut p);
            p
        };
        // +100 makes the worst token the choice; -100 keeps the best out.
        assert_eq!(greedy(with(|p| p.logit_bias = vec![(3, 100.0)]), &[0]), 3);
        assert_eq!(greedy(with(|p| p.logit_bias = vec![(0, -100.0)]), &[0]), 1);
        assert_eq!(
            greedy(with(|p| p.allowed_token_ids = Some(vec![2, 3])), &[0]),
            2
        );
        // A one-token bad word is always banned; a longer one only after its prefix.
        assert_eq!(greedy(with(|p| p.bad_words = vec![vec![0]]), &[0]), 1);
        let two = with(|p| p.bad_words = vec![vec![2, 0]]);
        assert_eq!(greedy(two.clone(), &[9]), 0);
        assert_eq!(greedy(two, &[9, 2]), 1);
        // min_tokens holds the stop token back until enough output exists.
        let min = with(|p| {
            p.min_tokens = 2;
            p.stop_token_ids = vec![0];
        });
        assert_eq!(greedy(min.clone(), &[9, 5]), 1);
        assert_eq!(greedy(min, &[9, 5, 5]), 0);
    }

    #[test]
    fn a_mask_limits_the_choice_but_not_the_raw_logprobs() {
        let row = vec![1.0, 0.5, 0.0, -1.0];
        let mask = TokenMask::from_words(vec![0b1100]);
        let p = SamplingParams {
            logprobs: Some(1),
            ..SamplingParams::greedy()
        };
        let (t, lp) = sample(&mut row.clone(), &p, &[0], 1, Some(&mask));
        assert_eq!(t, 2);
        let lse = row.iter().map(|l: &f32| l.exp()).sum::<f32>().ln();
        let lp = lp.unwrap();
        assert!((lp.logprob - (0.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top[0].0, 0, "top alternatives come from the raw logits");
        for seed in 0..50 {
            let p = SamplingParams { seed, ..params() };
            assert!(sample(&mut row.clone(), &p, &[0], 1, Some(&mask)).0 >= 2);
        }
    }
}
