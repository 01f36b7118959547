//! Chat templates: the model's own Jinja template, rendered the way
//! transformers' `apply_chat_template` does (trim_blocks, lstrip_blocks,
//! loop controls, Python string methods, `raise_exception`).

use minijinja::{context, Environment, Error, ErrorKind};
use serde_json::Value as Json;

use crate::error::{EngineError, Result};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source).map_err(|e| {
            EngineError::Template(format!("the model's chat template does not parse: {e}"))
        })?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages` (OpenAI shape, content already flattened to text).
    pub fn render(&self, messages: &[Json], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &Json::Null)
    }

    /// Renders with more variables for the template (`chat_template_kwargs`
    /// such as Qwen3's `enable_thinking`); they never replace the messages
    /// or the special tokens.
    pub fn render_with(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        extra: &Json,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            ..minijinja::Value::from_serialize(extra)
        })
        .map_err(|e| {
            // `raise_exception` messages are the template telling the user what is wrong.
            let detail = e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            EngineError::Template(detail)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_like_transformers_with_block_trimming() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ m['role'] | upper }}: {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}".into(),
            None,
            None,
        )
        .unwrap();
        let out = t
            .render(&[json!({"role": "user", "content": "  hi "})], true)
            .unwrap();
        // What Jinja2 (trim_blocks, lstrip_blocks) renders for the same input.
        assert_eq!(out, "  USER: hi\nA:");
    }

    #[test]
    fn template_kwargs_reach_the_template_but_not_over_the_messages() {
        let t = ChatTemplate::new(
            "{{ messages[0].content }}{% if enable_thinking is false %}<think></think>{% endif %}"
                .into(),
            None,
            None,
        )
        .unwrap();
        let m = [json!({"role": "user", "content": "hi"})];
        let off = json!({"enable_thinking": false, "messages": []});
        assert_eq!(t.render_with(&m, true, &off).unwrap(), "hi<think></think>");
        assert_eq!(t.render(&m, true).unwrap(), "hi");
    }

    #[test]
    fn raise_exception_becomes_a_template_error() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}".into(),
            None,
            None,
        )
        .unwrap();
        let e = t
            .render(&[json!({"role": "assistant", "content": "x"})], true)
            .unwrap_err();
        assert!(e.to_string().contains("first message must be user"), "{e}");
    }
}
