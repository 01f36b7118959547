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
        env.add_filter("tojson", tojson);
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

/// transformers' `tojson`: Python's `json.dumps` (`", "` and `": "` between
/// items, keys in their order, non-ASCII as is, no HTML escaping), so tool
/// schemas and call arguments reach the model spelled as in training.
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            serde::Serialize::serialize(
                &value,
                &mut serde_json::Serializer::with_formatter(&mut out, fmt),
            )
        }
        None => serde::Serialize::serialize(
            &value,
            &mut serde_json::Serializer::with_formatter(&mut out, PythonJson),
        ),
    };
    written.map_err(|e| Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    Ok(minijinja::Value::from_safe_string(text))
}

/// `json.dumps`' default separators.
struct PythonJson;

fn item_separator<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(w, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
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

    /// A multi-turn tool conversation through a Qwen-style tools template,
    /// against transformers' rendering (tests/fixtures/make_template_reference.py).
    #[test]
    fn tool_conversations_render_as_transformers_renders_them() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/templates");
        let cases: Json =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        for case in cases.as_array().unwrap() {
            let source =
                std::fs::read_to_string(dir.join(case["template"].as_str().unwrap())).unwrap();
            let t = ChatTemplate::new(source, None, None).unwrap();
            let extra = match &case["tools"] {
                Json::Null => Json::Null,
                tools => json!({ "tools": tools }),
            };
            let got = t
                .render_with(case["messages"].as_array().unwrap(), true, &extra)
                .unwrap();
            assert_eq!(got, case["rendered"].as_str().unwrap());
        }
    }

    #[test]
    fn tojson_spells_like_python() {
        let t = ChatTemplate::new(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}".into(),
            None,
            None,
        )
        .unwrap();
        let out = t
            .render_with(&[], false, &json!({"x": {"b": [1, "é<"], "a": {}}}))
            .unwrap();
        assert_eq!(out, "{\"b\": [1, \"é<\"], \"a\": {}}|{\n  \"b\": [\n    1,\n    \"é<\"\n  ],\n  \"a\": {}\n}");
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
