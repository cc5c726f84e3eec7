//! Input validation: what a flow's validator returns, and validators from other crates.
//!
//! A validator runs before anything else in a run (before the store is touched). It
//! returns every [`Issue`] it found, each with the path of the field it is about
//! (`items[2].quantity`) and a message; any issue fails the run with
//! [`FlowError::Validation`](crate::FlowError::Validation) and no step runs. It may be
//! synchronous ([`FlowBuilder::validate`](crate::FlowBuilder::validate)) or async
//! ([`FlowBuilder::validate_async`](crate::FlowBuilder::validate_async)). A validator that
//! panics rejects the input; the panic never unwinds through the run.
//!
//! A validator may return anything [`IntoIssues`]: `Vec<Issue>`, bare messages
//! (`Vec<String>`, `String`, `&str`), and with the `garde` feature a
//! [`garde::Report`](https://docs.rs/garde/latest/garde/error/struct.Report.html), so an
//! input type that derives `garde::Validate` is validated with
//! `.validate(orchestrix::validation::garde)`.
//!
//! ```
//! use orchestrix::validation::Issue;
//! use orchestrix::{Flow, FlowError, RunOptions};
//!
//! #[derive(serde::Serialize)]
//! struct Order { items: Vec<u32> }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let flow = Flow::<Order>::builder("checkout")
//!     .validate(|order: &Order| {
//!         let issues: Vec<Issue> = order.items.iter().enumerate()
//!             .filter(|(_, quantity)| **quantity == 0)
//!             .map(|(i, _)| Issue::at(format!("items[{i}]"), "must be > 0"))
//!             .collect();
//!         if issues.is_empty() { Ok(()) } else { Err(issues) }
//!     })
//!     .step("ship", |_ctx| async { Ok(()) })
//!     .build()?;
//! let result = flow.run(Order { items: vec![1, 0] }, RunOptions::new()).await?;
//! let Some(FlowError::Validation { issues }) = &result.error else { unreachable!() };
//! assert_eq!(issues[0].to_string(), "items[1]: must be > 0");
//! # Ok(()) }
//! ```

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// One thing wrong with an input: where (`path`, empty for the input as a whole) and what.
///
/// Displayed as `path: message`, or `message` alone without a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Issue {
    /// The field the issue is about, as a path (`items[2].quantity`); empty for the input
    /// as a whole.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl Issue {
    /// An issue about the input as a whole.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            path: String::new(),
            message: message.into(),
        }
    }

    /// An issue about the field at `path`.
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl<'de> Deserialize<'de> for Issue {
    /// Reads `{"path": ..., "message": ...}`, and the bare string earlier builds wrote.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Structured {
                #[serde(default)]
                path: String,
                message: String,
            },
            Bare(String),
        }
        Ok(match Form::deserialize(deserializer)? {
            Form::Structured { path, message } => Self { path, message },
            Form::Bare(message) => Self::new(message),
        })
    }
}

impl From<String> for Issue {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for Issue {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

/// What a validator may return as its error: the issues it found.
pub trait IntoIssues {
    /// The issues, in the order found.
    fn into_issues(self) -> Vec<Issue>;
}

impl<T: Into<Issue>> IntoIssues for Vec<T> {
    fn into_issues(self) -> Vec<Issue> {
        self.into_iter().map(Into::into).collect()
    }
}

impl IntoIssues for Issue {
    fn into_issues(self) -> Vec<Issue> {
        vec![self]
    }
}

impl IntoIssues for String {
    fn into_issues(self) -> Vec<Issue> {
        vec![Issue::new(self)]
    }
}

impl IntoIssues for &str {
    fn into_issues(self) -> Vec<Issue> {
        vec![Issue::new(self)]
    }
}

#[cfg(feature = "garde")]
impl IntoIssues for ::garde::Report {
    /// One issue per error, at its field's path as `garde` writes it (`items[2].quantity`).
    fn into_issues(self) -> Vec<Issue> {
        self.into_inner()
            .into_iter()
            .map(|(path, error)| Issue::at(path.to_string(), error.message()))
            .collect()
    }
}

/// A flow validator for any input that derives (or implements) `garde::Validate` with a
/// default context: `.validate(orchestrix::validation::garde)`. Each of `garde`'s errors
/// becomes an [`Issue`] at its field's path.
///
/// ```
/// use orchestrix::{Flow, FlowError, RunOptions};
///
/// #[derive(serde::Serialize, garde::Validate)]
/// struct Line {
///     #[garde(range(min = 1))]
///     quantity: u32,
/// }
///
/// #[derive(serde::Serialize, garde::Validate)]
/// struct Order {
///     #[garde(dive)]
///     items: Vec<Line>,
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let flow = Flow::<Order>::builder("checkout")
///     .validate(orchestrix::validation::garde)
///     .step("ship", |_ctx| async { Ok(()) })
///     .build()?;
/// let order = Order { items: vec![Line { quantity: 1 }, Line { quantity: 1 }, Line { quantity: 0 }] };
/// let result = flow.run(order, RunOptions::new()).await?;
/// let Some(FlowError::Validation { issues }) = &result.error else { unreachable!() };
/// assert_eq!(issues[0].path, "items[2].quantity");
/// # Ok(()) }
/// ```
///
/// # Errors
/// `garde`'s report when the input is not valid.
#[cfg(feature = "garde")]
pub fn garde<I>(input: &I) -> Result<(), ::garde::Report>
where
    I: ::garde::Validate,
    I::Context: Default,
{
    input.validate()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_display_their_path_before_their_message() {
        assert_eq!(
            Issue::at("items[2].quantity", "must be > 0").to_string(),
            "items[2].quantity: must be > 0"
        );
        assert_eq!(Issue::new("empty order").to_string(), "empty order");
    }

    #[test]
    fn issues_read_back_structured_and_as_the_bare_strings_of_earlier_builds() {
        let issue = Issue::at("a", "b");
        let json = serde_json::to_string(&issue).ok();
        assert_eq!(json.as_deref(), Some(r#"{"path":"a","message":"b"}"#));
        let back: Option<Issue> = json.and_then(|j| serde_json::from_str(&j).ok());
        assert_eq!(back, Some(issue));
        let bare: Option<Issue> = serde_json::from_str(r#""quantity must be positive""#).ok();
        assert_eq!(bare, Some(Issue::new("quantity must be positive")));
    }
}
