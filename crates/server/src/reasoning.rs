//! Reasoning parsers (`--reasoning-parser`, vLLM's names): split a model's
//! `<think>…</think>` from its answer, as text streams in, into
//! `reasoning_content` and `content`.

/// Which models' convention to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    /// DeepSeek-R1: the chat template opens `<think>`, so the output starts
    /// in reasoning; everything up to `</think>` is reasoning.
    DeepSeekR1,
    /// Qwen3: reasoning only when the output opens with `<think>` (thinking
    /// can be switched off, and then there is none).
    Qwen3,
}

impl ReasoningParser {
    pub const NAMES: &'static [&'static str] = &["deepseek_r1", "qwen3"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "deepseek_r1" => Some(Self::DeepSeekR1),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }
}

pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// What one piece of output adds to each part.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing seen yet: a leading `<think>` may come.
    Start,
    Reasoning,
    Content,
}

/// One choice's splitter. Text that could be the start of a tag is held
/// back until the next piece shows whether it is one, so a tag split across
/// tokens is still found.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    parser: ReasoningParser,
    phase: Phase,
    held: String,
}

/// The length of the longest suffix of `s` that begins `tag`.
fn partial_tag(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl ReasoningSplitter {
    /// `prompt_closed`: the prompt already ended the reasoning (a template
    /// that switched thinking off writes `<think></think>` itself).
    pub fn new(parser: ReasoningParser, prompt_closed: bool) -> Self {
        Self {
            parser,
            phase: if prompt_closed {
                Phase::Content
            } else {
                Phase::Start
            },
            held: String::new(),
        }
    }

    /// Takes the next piece of output; `last` flushes whatever is held.
    pub fn push(&mut self, text: &str, last: bool) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match self.phase {
                Phase::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(THINK_START) {
                        self.held = rest.to_string();
                        self.phase = Phase::Reasoning;
                    } else if !last && THINK_START.starts_with(t) {
                        // Too little yet to tell (all whitespace or `<thi`).
                        return out;
                    } else {
                        self.phase = match self.parser {
                            ReasoningParser::DeepSeekR1 => Phase::Reasoning,
                            ReasoningParser::Qwen3 => Phase::Content,
                        };
                    }
                }
                Phase::Reasoning => {
                    if let Some(at) = self.held.find(THINK_END) {
                        out.reasoning.push_str(&self.held[..at]);
                        self.held = self.held[at + THINK_END.len()..].to_string();
                        self.phase = Phase::Content;
                        continue;
                    }
                    let keep = if last {
                        0
                    } else {
                        partial_tag(&self.held, THINK_END)
                    };
                    let emit = self.held.len() - keep;
                    out.reasoning.push_str(&self.held[..emit]);
                    self.held.drain(..emit);
                    return out;
                }
                Phase::Content => {
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one by one and joins what comes out.
    fn streamed(parser: ReasoningParser, pieces: &[&str]) -> Split {
        let mut s = ReasoningSplitter::new(parser, false);
        let mut all = Split::default();
        for (i, p) in pieces.iter().enumerate() {
            let d = s.push(p, i + 1 == pieces.len());
            all.reasoning += &d.reasoning;
            all.content += &d.content;
        }
        all
    }

    fn split(reasoning: &str, content: &str) -> Split {
        Split {
            reasoning: reasoning.into(),
            content: content.into(),
        }
    }

    #[test]
    fn deepseek_r1_reasons_until_the_end_tag_even_without_a_start_tag() {
        use ReasoningParser::DeepSeekR1 as R1;
        // R1's template opens <think> in the prompt.
        let want = split("Let me add: 2+2=4.\n", "\n\nThe answer is 4.");
        let text = "Let me add: 2+2=4.\n</think>\n\nThe answer is 4.";
        assert_eq!(ReasoningSplitter::new(R1, false).push(text, true), want);
        // The same with the start tag, and with the end tag cut in three.
        assert_eq!(
            streamed(
                R1,
                &[
                    "<think>",
                    "Let me add: 2+2=4.\n</",
                    "thi",
                    "nk>\n\nThe answer is 4."
                ]
            ),
            want
        );
        // Cut by max_tokens before the end: all of it is reasoning.
        assert_eq!(streamed(R1, &["Hmm, ", "</thi"]), split("Hmm, </thi", ""));
    }

    #[test]
    fn qwen3_reasons_only_inside_think_tags() {
        use ReasoningParser::Qwen3;
        let text = "<think>\nThe user greets me.\n</think>\n\nHello!";
        let want = split("\nThe user greets me.\n", "\n\nHello!");
        assert_eq!(ReasoningSplitter::new(Qwen3, false).push(text, true), want);
        let pieces: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        assert_eq!(streamed(Qwen3, &pieces), want, "one character per piece");
        // Thinking off: no tags, all answer; a `<` that is not a tag stays.
        assert_eq!(streamed(Qwen3, &["<", "b>Hi</b>"]), split("", "<b>Hi</b>"));
        // The prompt closed the reasoning: nothing is reasoning.
        let mut s = ReasoningSplitter::new(Qwen3, true);
        assert_eq!(
            s.push("<think>x</think>y", true),
            split("", "<think>x</think>y")
        );
    }

    #[test]
    fn multibyte_text_never_splits_inside_a_character() {
        let d = streamed(ReasoningParser::DeepSeekR1, &["思考", "中</", "think>答え"]);
        assert_eq!(d, split("思考中", "答え"));
    }
}
