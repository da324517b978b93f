//! The OpenAI API's request fields and error bodies: each field read on its own, so that a bad
//! one is named (`max_tokens: expected an integer >= 0, got -1`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// An error answered with OpenAI's body: `{"error": {message, type, param, code}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
        }
    }

    /// With an error code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// With a status.
    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// A failure of the server (500).
    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// A request body as a JSON object.
pub struct Fields {
    map: Map<String, Value>,
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("a list of {} items", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

impl Fields {
    /// Parse `body`: malformed JSON or something other than an object is a 400.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid(None, format!("the request body is not valid JSON: {e}"))
        })?;
        match v {
            Value::Object(map) => Ok(Self { map }),
            other => Err(ApiError::invalid(
                None,
                format!(
                    "the request body must be a JSON object, got {}",
                    kind(&other)
                ),
            )),
        }
    }

    /// The raw value of a field that is present and not null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn bad(key: &str, expected: &str, got: &Value) -> ApiError {
        ApiError::invalid(
            Some(key.to_string()),
            format!("{key}: expected {expected}, got {}", kind(got)),
        )
    }

    /// A required field.
    pub fn required(&self, key: &str) -> Result<&Value, ApiError> {
        self.get(key)
            .ok_or_else(|| ApiError::invalid(Some(key.to_string()), format!("`{key}` is required")))
    }

    /// An optional boolean.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| Self::bad(key, "true or false", v))
            })
            .transpose()
    }

    /// An optional integer in `min..=max`.
    pub fn uint(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .filter(|n| (min..=max).contains(n))
                    .ok_or_else(|| {
                        let expected = if max == u64::MAX {
                            format!("an integer >= {min}")
                        } else {
                            format!("an integer from {min} to {max}")
                        };
                        Self::bad(key, &expected, v)
                    })
            })
            .transpose()
    }

    /// An optional number in `[min, max]`.
    pub fn number(&self, key: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .filter(|x| *x >= min && *x <= max)
                    .ok_or_else(|| Self::bad(key, &format!("a number from {min} to {max}"), v))
            })
            .transpose()
    }

    /// An optional string.
    pub fn string(&self, key: &str) -> Result<Option<&str>, ApiError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| Self::bad(key, "a string", v)))
            .transpose()
    }

    /// `stop`: a string or a list of strings.
    pub fn stop(&self) -> Result<Vec<String>, ApiError> {
        match self.get("stop") {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(v @ Value::Array(a)) => a
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Self::bad("stop", "a string or a list of strings", v)),
            Some(v) => Err(Self::bad("stop", "a string or a list of strings", v)),
        }
        .map(|v| v.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// `stream_options.include_usage`.
    pub fn include_usage(&self) -> bool {
        self.get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// A prompt of `/v1/completions`: text or token ids.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of lists of ids.
pub fn prompts(v: &Value) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        Fields::bad(
            "prompt",
            "a string, a list of strings, a list of token ids or a list of lists of token ids",
            v,
        )
    };
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    };
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(a) if a.is_empty() => return Err(bad()),
        Value::Array(a) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_string()))
            .collect(),
        Value::Array(a) if a.iter().all(Value::is_number) => {
            vec![Prompt::Ids(ids(a).ok_or_else(bad)?)]
        }
        Value::Array(a) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|p| {
                p.as_array()
                    .and_then(|p| ids(p))
                    .map(Prompt::Ids)
                    .ok_or_else(bad)
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    Ok(out)
}

/// `messages` of `/v1/chat/completions`: `(role, text)`; `content` is a string or a list of
/// `{"type": "text", "text": ...}` parts.
pub fn messages(v: &Value) -> Result<Vec<(String, String)>, ApiError> {
    let bad = |i: usize, what: &str| {
        ApiError::invalid(
            Some(format!("messages[{i}]")),
            format!("messages[{i}]: {what}"),
        )
    };
    let list = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
        Fields::bad(
            "messages",
            "a non-empty list of {\"role\", \"content\"} objects",
            v,
        )
    })?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(i, "expected an object with a string \"role\""))?;
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                        _ => Err(bad(i, "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")),
                    })
                    .collect::<Result<String, _>>()?,
                Some(_) => return Err(bad(i, "\"content\" must be a string or a list of text parts")),
            };
            Ok((role.to_string(), content))
        })
        .collect()
}
