//! Token ids → streamed text: valid UTF-8 deltas, stop strings matched
//! across token boundaries and never sent.

use strata_types::TokenId;

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Prompt tokens kept as decoding context, so the first output token decodes
/// as it would mid-text (SentencePiece drops a leading space otherwise).
const CONTEXT_TOKENS: usize = 4;

#[derive(Debug)]
pub struct IncrementalDetokenizer {
    ids: Vec<TokenId>,
    prefix_offset: usize,
    read_offset: usize,
    /// Output text so far (cut at a stop string once one is found).
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
    stop: Vec<String>,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    pub fn new(prompt: &[TokenId], stop: Vec<String>, skip_special_tokens: bool) -> Self {
        let ctx = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let n = ctx.len();
        Self {
            ids: ctx,
            prefix_offset: 0,
            read_offset: n,
            text: String::new(),
            sent: 0,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            skip_special_tokens,
        }
    }

    /// The whole output text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Appends a token. Returns true when the text now contains a stop string
    /// (the text is cut just before it).
    pub fn push(&mut self, tok: &Tokenizer, id: TokenId) -> Result<bool> {
        self.ids.push(id);
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        // An incomplete multi-byte character decodes to U+FFFD: wait for more.
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(false);
        }
        let delta = full.get(prefix.len()..).unwrap_or(&full);
        let before = self.text.len();
        self.text.push_str(delta);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(self.find_stop(before))
    }

    /// Decodes whatever is still pending (a trailing partial character) at the end.
    /// Returns true when the flushed text completed a stop string.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<bool> {
        let mut stopped = false;
        if self.read_offset < self.ids.len() {
            let prefix = tok.decode(
                &self.ids[self.prefix_offset..self.read_offset],
                self.skip_special_tokens,
            )?;
            let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
            if let Some(rest) = full.get(prefix.len()..) {
                let before = self.text.len();
                self.text.push_str(rest);
                stopped = self.find_stop(before);
            }
            self.read_offset = self.ids.len();
        }
        Ok(stopped)
    }

    /// The text not yet handed out. Until `finished`, a tail that could be
    /// the start of a stop string is held back.
    pub fn take_delta(&mut self, finished: bool) -> String {
        let end = if finished {
            self.text.len()
        } else {
            self.text.len() - self.partial_stop_len()
        };
        if end <= self.sent {
            return String::new();
        }
        let d = self.text[self.sent..end].to_string();
        self.sent = end;
        d
    }

    fn find_stop(&mut self, appended_at: usize) -> bool {
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        if longest == 0 {
            return false;
        }
        // Only a match that ends in the new text can be new.
        let mut from = appended_at.saturating_sub(longest - 1);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(i) = hit {
            self.text.truncate(i);
            self.sent = self.sent.min(i);
            return true;
        }
        false
    }

    /// Bytes at the end of the text that are a proper prefix of a stop string.
    fn partial_stop_len(&self) -> usize {
        let mut best = 0;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && self.text.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best
    }
}
