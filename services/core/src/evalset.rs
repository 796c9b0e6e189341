//! Eval sets in JSONL: one item per line, all items of one kind.
//!
//! - multiple choice: `{"prompt": "...", "choices": ["...", "..."], "label": 1}`, scored by
//!   the summed log-probability of each choice's tokens after the prompt; the metric is
//!   accuracy.
//! - completion: `{"prompt": "...", "completion": "..."}`, scored by the mean negative
//!   log-likelihood of the completion's tokens after the prompt.
//!
//! Blank lines are skipped; other keys on a line (an `id`, a `source`) are ignored. A
//! malformed line is refused with its 1-based line number; so are an empty set and a set
//! mixing the two kinds.
//!
//! Only the format lives here (parsed from bytes, no tokenizer, no model): the registry
//! refuses a malformed set at push with it, and `patchport-eval` scores the parsed items
//! (and re-exports these types).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An eval set that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalSetError {
    /// A line that is not a valid item.
    #[error("eval set line {line}: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No items at all.
    #[error("eval set has no items")]
    Empty,
}

/// The kind of every item of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// `prompt`, `choices`, `label`.
    MultipleChoice,
    /// `prompt`, `completion`.
    Completion,
}

impl ItemKind {
    fn describe(self) -> &'static str {
        match self {
            ItemKind::MultipleChoice => "multiple-choice",
            ItemKind::Completion => "completion",
        }
    }
}

/// One item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Item {
    /// A multiple-choice item.
    MultipleChoice {
        /// The text before each choice.
        prompt: String,
        /// At least two non-empty continuations.
        choices: Vec<String>,
        /// The index of the correct choice.
        label: usize,
    },
    /// A completion item.
    Completion {
        /// The text before the completion.
        prompt: String,
        /// The continuation whose likelihood is measured.
        completion: String,
    },
}

impl Item {
    /// The item's kind.
    pub fn kind(&self) -> ItemKind {
        match self {
            Item::MultipleChoice { .. } => ItemKind::MultipleChoice,
            Item::Completion { .. } => ItemKind::Completion,
        }
    }

    /// The prompt.
    pub fn prompt(&self) -> &str {
        match self {
            Item::MultipleChoice { prompt, .. } | Item::Completion { prompt, .. } => prompt,
        }
    }

    /// The continuations scored after the prompt: the choices, or the one completion.
    pub fn continuations(&self) -> &[String] {
        match self {
            Item::MultipleChoice { choices, .. } => choices,
            Item::Completion { completion, .. } => std::slice::from_ref(completion),
        }
    }
}

/// A parsed eval set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalSet {
    kind: ItemKind,
    items: Vec<Item>,
    lines: Vec<usize>,
}

fn non_empty_string(obj: &serde_json::Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        None => Err(format!("missing {key:?}")),
        Some(Value::String(s)) if s.is_empty() => Err(format!("{key:?} is empty")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{key:?} must be a string, found {other}")),
    }
}

fn parse_item(text: &str) -> Result<Item, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("expected a JSON object".to_owned());
    };
    let has_choices = obj.contains_key("choices");
    let has_completion = obj.contains_key("completion");
    match (has_choices, has_completion) {
        (true, true) => Err("has both \"choices\" and \"completion\"".to_owned()),
        (false, false) => {
            Err("expected \"choices\" and \"label\" (multiple choice) or \"completion\"".to_owned())
        }
        (false, true) => {
            let prompt = non_empty_string(&obj, "prompt")?;
            let completion = non_empty_string(&obj, "completion")?;
            Ok(Item::Completion { prompt, completion })
        }
        (true, false) => {
            let prompt = non_empty_string(&obj, "prompt")?;
            let Some(Value::Array(raw)) = obj.get("choices") else {
                return Err("\"choices\" must be a list of strings".to_owned());
            };
            let mut choices = Vec::with_capacity(raw.len());
            for (i, c) in raw.iter().enumerate() {
                match c {
                    Value::String(s) if s.is_empty() => {
                        return Err(format!("choice {i} is empty"));
                    }
                    Value::String(s) => choices.push(s.clone()),
                    other => return Err(format!("choice {i} must be a string, found {other}")),
                }
            }
            if choices.len() < 2 {
                return Err(format!("needs at least 2 choices, found {}", choices.len()));
            }
            let label = match obj.get("label") {
                None => return Err("missing \"label\"".to_owned()),
                Some(v) => v.as_u64().ok_or_else(|| {
                    format!("\"label\" must be a non-negative integer, found {v}")
                })?,
            };
            let label = usize::try_from(label)
                .ok()
                .filter(|&l| l < choices.len())
                .ok_or_else(|| {
                    format!(
                        "label {label} is out of range for {} choices",
                        choices.len()
                    )
                })?;
            Ok(Item::MultipleChoice {
                prompt,
                choices,
                label,
            })
        }
    }
}

impl EvalSet {
    /// Parses a JSONL eval set.
    pub fn parse(bytes: &[u8]) -> Result<Self, EvalSetError> {
        let mut items = Vec::new();
        let mut lines = Vec::new();
        let mut kind: Option<(ItemKind, usize)> = None;
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = i + 1;
            let err = |message: String| EvalSetError::Line { line, message };
            let text = std::str::from_utf8(raw)
                .map_err(|e| err(format!("not UTF-8: {e}")))?
                .trim();
            if text.is_empty() {
                continue;
            }
            let item = parse_item(text).map_err(err)?;
            match kind {
                None => kind = Some((item.kind(), line)),
                Some((k, first)) if k != item.kind() => {
                    return Err(err(format!(
                        "a {} item in a {} set (line {first}); one kind per file",
                        item.kind().describe(),
                        k.describe()
                    )));
                }
                Some(_) => {}
            }
            items.push(item);
            lines.push(line);
        }
        let Some((kind, _)) = kind else {
            return Err(EvalSetError::Empty);
        };
        Ok(Self { kind, items, lines })
    }

    /// The kind of every item.
    pub fn kind(&self) -> ItemKind {
        self.kind
    }

    /// The items, in file order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The 1-based line of item `index`.
    pub fn line_of(&self, index: usize) -> usize {
        self.lines.get(index).copied().unwrap_or(0)
    }

    /// The number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Never true for a parsed set (an empty set is refused); here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_err(text: &str) -> (usize, String) {
        match EvalSet::parse(text.as_bytes()) {
            Err(EvalSetError::Line { line, message }) => (line, message),
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn parses_both_kinds_and_skips_blank_lines() {
        let mc = EvalSet::parse(
            b"{\"prompt\":\"a\",\"choices\":[\" x\",\" y z\"],\"label\":1,\"id\":7}\n\n{\"prompt\":\"b\",\"choices\":[\"p\",\"q\",\"r\"],\"label\":0}\n",
        )
        .unwrap();
        assert_eq!(mc.kind(), ItemKind::MultipleChoice);
        assert_eq!(mc.len(), 2);
        assert_eq!(mc.line_of(1), 3);
        assert_eq!(mc.items()[0].continuations(), [" x", " y z"]);
        let c = EvalSet::parse(b"{\"prompt\":\"a\",\"completion\":\" b\"}").unwrap();
        assert_eq!(c.kind(), ItemKind::Completion);
        assert_eq!(c.items()[0].continuations(), [" b"]);
    }

    #[test]
    fn refuses_malformed_lines_with_their_number() {
        let ok = "{\"prompt\":\"a\",\"choices\":[\"x\",\"y\"],\"label\":0}\n";
        let cases = [
            ("not json", "not JSON"),
            ("[1,2]", "expected a JSON object"),
            ("{\"prompt\":\"a\"}", "expected \"choices\""),
            (
                "{\"prompt\":\"a\",\"choices\":[\"x\"],\"label\":0}",
                "at least 2 choices",
            ),
            (
                "{\"prompt\":\"a\",\"choices\":[\"x\",\"y\"],\"label\":2}",
                "out of range",
            ),
            (
                "{\"prompt\":\"a\",\"choices\":[\"x\",\"y\"],\"label\":-1}",
                "non-negative",
            ),
            (
                "{\"prompt\":\"a\",\"choices\":[\"x\",\"y\"],\"label\":1.5}",
                "non-negative",
            ),
            (
                "{\"prompt\":\"a\",\"choices\":[\"x\",\"y\"]}",
                "missing \"label\"",
            ),
            (
                "{\"prompt\":\"\",\"choices\":[\"x\",\"y\"],\"label\":0}",
                "\"prompt\" is empty",
            ),
            (
                "{\"prompt\":\"a\",\"choices\":[\"x\",\"\"],\"label\":0}",
                "choice 1 is empty",
            ),
            (
                "{\"prompt\":\"a\",\"choices\":[\"x\",3],\"label\":0}",
                "choice 1 must be a string",
            ),
            (
                "{\"choices\":[\"x\",\"y\"],\"label\":0}",
                "missing \"prompt\"",
            ),
            (
                "{\"prompt\":\"a\",\"completion\":\"\"}",
                "\"completion\" is empty",
            ),
            (
                "{\"prompt\":\"a\",\"completion\":\"b\",\"choices\":[\"x\",\"y\"],\"label\":0}",
                "both",
            ),
            (
                "{\"prompt\":\"a\",\"completion\":\"b\"}",
                "one kind per file",
            ),
        ];
        for (bad, want) in cases {
            let (line, message) = line_err(&format!("{ok}\n{bad}\n"));
            assert_eq!(line, 3, "{bad}");
            assert!(message.contains(want), "{bad}: {message}");
            assert!(
                !message.starts_with(char::is_uppercase),
                "lowercase: {message}"
            );
        }
        let (line, message) = line_err("\u{0}\n");
        assert_eq!(line, 1);
        assert!(message.contains("not JSON"));
        assert!(matches!(
            EvalSet::parse(&[b'{', 0xff, b'}']),
            Err(EvalSetError::Line { line: 1, .. })
        ));
    }

    #[test]
    fn refuses_an_empty_set() {
        assert_eq!(EvalSet::parse(b""), Err(EvalSetError::Empty));
        assert_eq!(EvalSet::parse(b"\n  \n"), Err(EvalSetError::Empty));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_line_numbers_are_in_range(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let lines = bytes.split(|&b| b == b'\n').count();
            match EvalSet::parse(&bytes) {
                Ok(set) => {
                    proptest::prop_assert!(!set.is_empty());
                    for i in 0..set.len() {
                        proptest::prop_assert!((1..=lines).contains(&set.line_of(i)));
                    }
                }
                Err(EvalSetError::Line { line, .. }) => {
                    proptest::prop_assert!((1..=lines).contains(&line));
                }
                Err(EvalSetError::Empty) => {}
            }
        }
    }
}
