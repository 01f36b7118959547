//! The one place responses are framed: whole bodies, and the SSE stream
//! chat and completions share (each chunk one choice's delta, the usage
//! chunk after the last choice finishes, an error chunk if a choice fails,
//! then `[DONE]`).

use std::collections::HashMap;
use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use serde::Serialize;
use strata_engine::RequestOutput;

use crate::error::ApiError;
use crate::generate::{self, total_usage, Choice, Delta};
use crate::response::{Envelope, Usage};

/// What every body of one call carries.
pub struct Frame {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Frame {
    pub fn new(prefix: &str, model: String) -> Self {
        Self {
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model,
        }
    }

    fn envelope<C>(
        &self,
        object: &'static str,
        choices: Vec<C>,
        usage: Option<Option<Usage>>,
    ) -> Envelope<C> {
        Envelope {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    /// A non-streamed response: every choice at once, with the usage.
    pub fn whole<C: Serialize>(
        &self,
        object: &'static str,
        choices: Vec<C>,
        usage: Usage,
    ) -> Response {
        axum::Json(self.envelope(object, choices, Some(Some(usage)))).into_response()
    }

    /// Streams `choices`: first the `opening` chunk choices, then whatever
    /// `render(index, prompt_index, output)` makes of each output as it
    /// arrives, one chunk per chunk choice.
    pub fn stream<C, R>(
        self,
        object: &'static str,
        include_usage: bool,
        choices: Vec<Choice>,
        opening: Vec<C>,
        mut render: R,
    ) -> Response
    where
        C: Serialize + Send + 'static,
        R: FnMut(usize, usize, &RequestOutput) -> Vec<C> + Send + 'static,
    {
        let num_choices = choices.len();
        let mut usage: HashMap<usize, (usize, Usage)> = HashMap::new();
        let mut finished = 0;
        let usage_field = move |u: Option<Usage>| include_usage.then_some(u);
        let first: Vec<_> = opening
            .into_iter()
            .map(|c| event(&self.envelope(object, vec![c], usage_field(None))))
            .collect();
        let body = generate::merge(choices).flat_map(move |d: Delta| {
            let mut events = Vec::new();
            match &d.output {
                // A failure mid-stream is told in OpenAI's error shape; the
                // stream then ends with `[DONE]`.
                Err(e) => events.push(event(&ApiError::from(e).to_json())),
                Ok(o) => {
                    for c in render(d.index, d.prompt_index, o) {
                        events.push(event(&self.envelope(object, vec![c], usage_field(None))));
                    }
                    usage.insert(d.index, (d.prompt_index, d.usage));
                    finished += usize::from(o.finish.is_some());
                    if include_usage && o.finish.is_some() && finished == num_choices {
                        let total = total_usage(usage.iter().map(|(&c, &(p, u))| (c, p, u)));
                        let chunk = self.envelope::<C>(object, Vec::new(), Some(Some(total)));
                        events.push(event(&chunk));
                    }
                }
            }
            stream::iter(events)
        });
        let done = stream::once(async { Ok::<_, Infallible>(Event::default().data("[DONE]")) });
        Sse::new(stream::iter(first).chain(body).chain(done)).into_response()
    }
}

fn event(body: &impl Serialize) -> Result<Event, Infallible> {
    let json = serde_json::to_string(body).expect("response bodies serialize");
    Ok(Event::default().data(json))
}
